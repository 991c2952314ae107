"""Linear blend skinning for FLAME, as pure functions.

The operations and their order follow the SMPL/FLAME reference implementation used by
DECA, MICA and OFER (shape blend, joint regression, Rodrigues with the ``+1e-8`` norm
trick, pose blend shapes from ``R - I`` of the non-root joints, the rigid kinematic chain,
skinning), so results agree with those codebases to float rounding. All poses are
axis-angle vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "batch_rodrigues",
    "blend_shapes",
    "vertices2joints",
    "batch_rigid_transform",
    "lbs",
    "vertices2landmarks",
    "rotation_yaw_degrees",
]


def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors to rotation matrices.

    Args:
        rot_vecs: (N, 3) axis-angle vectors (radians).

    Returns:
        (N, 3, 3) rotation matrices. As in the reference code, the angle is
        ``||rvec + 1e-8||``, so a zero vector gives exactly the identity and the
        gradient at zero is finite.
    """
    n = rot_vecs.shape[0]
    dtype, device = rot_vecs.dtype, rot_vecs.device
    angle = torch.norm(rot_vecs + 1e-8, dim=1, keepdim=True)
    rot_dir = rot_vecs / angle
    cos = torch.unsqueeze(torch.cos(angle), dim=1)
    sin = torch.unsqueeze(torch.sin(angle), dim=1)
    rx, ry, rz = torch.split(rot_dir, 1, dim=1)
    zeros = torch.zeros((n, 1), dtype=dtype, device=device)
    K = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(n, 3, 3)
    ident = torch.eye(3, dtype=dtype, device=device).unsqueeze(0)
    return ident + sin * K + (1 - cos) * torch.bmm(K, K)


def blend_shapes(betas: torch.Tensor, shape_disps: torch.Tensor) -> torch.Tensor:
    """Linear blend shapes: (B, L) coefficients x (V, 3, L) basis -> (B, V, 3) offsets."""
    return torch.einsum("bl,mkl->bmk", betas, shape_disps)


def vertices2joints(J_regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Regress joints: (J, V) regressor x (B, V, 3) vertices -> (B, J, 3)."""
    return torch.einsum("bik,ji->bjk", vertices, J_regressor)


def _transform_mat(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotations and (N, 3, 1) translations -> (N, 4, 4) rigid transforms."""
    return torch.cat([F.pad(R, [0, 0, 0, 1]), F.pad(t, [0, 0, 0, 1], value=1)], dim=2)


def batch_rigid_transform(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the kinematic chain.

    Args:
        rot_mats: (B, J, 3, 3) local joint rotations.
        joints: (B, J, 3) rest-pose joint locations.
        parents: (J,) int64 parent indices, ``parents[0] == -1``; parents precede children.

    Returns:
        posed_joints (B, J, 3) and rel_transforms (B, J, 4, 4): the world transform of
        each joint with the rest-pose joint location removed, ready for skinning.
    """
    joints = torch.unsqueeze(joints, dim=-1)
    rel_joints = joints.clone()
    rel_joints[:, 1:] -= joints[:, parents[1:]]
    transforms_mat = _transform_mat(rot_mats.reshape(-1, 3, 3), rel_joints.reshape(-1, 3, 1))
    transforms_mat = transforms_mat.reshape(-1, joints.shape[1], 4, 4)
    chain = [transforms_mat[:, 0]]
    for i in range(1, parents.shape[0]):
        chain.append(torch.matmul(chain[int(parents[i])], transforms_mat[:, i]))
    transforms = torch.stack(chain, dim=1)
    posed_joints = transforms[:, :, :3, 3]
    joints_homogen = F.pad(joints, [0, 0, 0, 1])
    rel_transforms = transforms - F.pad(torch.matmul(transforms, joints_homogen), [3, 0, 0, 0, 0, 0, 0, 0])
    return posed_joints, rel_transforms


def lbs(
    betas: torch.Tensor,
    full_pose: torch.Tensor,
    v_template: torch.Tensor,
    shapedirs: torch.Tensor,
    posedirs: torch.Tensor,
    J_regressor: torch.Tensor,
    parents: torch.Tensor,
    lbs_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAME linear blend skinning.

    Args:
        betas: (B, L) shape and expression coefficients, concatenated.
        full_pose: (B, 3 * J) axis-angle pose of all joints ([global, neck, jaw, eyes]).
        v_template: (B, V, 3) or (V, 3) template vertices.
        shapedirs: (V, 3, L) blend shape basis.
        posedirs: (9 * (J - 1), 3 * V) pose corrective basis (transposed, as stored).
        J_regressor: (J, V) joint regressor.
        parents: (J,) kinematic tree.
        lbs_weights: (V, J) skinning weights.

    Returns:
        vertices (B, V, 3) and posed joints (B, J, 3).
    """
    batch_size = betas.shape[0]
    device, dtype = betas.device, betas.dtype
    if v_template.dim() == 2:
        v_template = v_template.unsqueeze(0).expand(batch_size, -1, -1)

    # 1. shape (identity + expression) blend shapes
    v_shaped = v_template + blend_shapes(betas, shapedirs)
    # 2. joints of the shaped mesh
    J = vertices2joints(J_regressor, v_shaped)
    # 3. pose blend shapes from (R - I) of the non-root joints
    ident = torch.eye(3, dtype=dtype, device=device)
    rot_mats = batch_rodrigues(full_pose.reshape(-1, 3)).view(batch_size, -1, 3, 3)
    pose_feature = (rot_mats[:, 1:, :, :] - ident).view(batch_size, -1)
    pose_offsets = torch.matmul(pose_feature, posedirs).view(batch_size, -1, 3)
    v_posed = pose_offsets + v_shaped
    # 4. rigid kinematic chain
    J_transformed, A = batch_rigid_transform(rot_mats, J, parents)
    # 5. skinning
    num_joints = J_regressor.shape[0]
    W = lbs_weights.unsqueeze(0).expand(batch_size, -1, -1)
    T = torch.matmul(W, A.view(batch_size, num_joints, 16)).view(batch_size, -1, 4, 4)
    ones = torch.ones([batch_size, v_posed.shape[1], 1], dtype=dtype, device=device)
    v_posed_homo = torch.cat([v_posed, ones], dim=2)
    v_homo = torch.matmul(T, torch.unsqueeze(v_posed_homo, dim=-1))
    verts = v_homo[:, :, :3, 0]
    return verts, J_transformed


def vertices2landmarks(
    vertices: torch.Tensor, faces: torch.Tensor, lmk_faces_idx: torch.Tensor, lmk_bary_coords: torch.Tensor
) -> torch.Tensor:
    """Barycentric landmarks on a mesh.

    Args:
        vertices: (B, V, 3).
        faces: (F, 3) int64.
        lmk_faces_idx: (B, L) or (L,) int64 face index per landmark.
        lmk_bary_coords: (B, L, 3) or (L, 3) barycentric coordinates.

    Returns:
        (B, L, 3): ``sum_k bary[l, k] * V[F[face_l, k]]``.
    """
    batch_size = vertices.shape[0]
    if lmk_faces_idx.dim() == 1:
        lmk_faces_idx = lmk_faces_idx.unsqueeze(0).expand(batch_size, -1)
    if lmk_bary_coords.dim() == 2:
        lmk_bary_coords = lmk_bary_coords.unsqueeze(0).expand(batch_size, -1, -1)
    lmk_vertex_idx = faces[lmk_faces_idx]  # (B, L, 3)
    batch_idx = torch.arange(batch_size, device=vertices.device).view(-1, 1, 1)
    lmk_vertices = vertices[batch_idx, lmk_vertex_idx]  # (B, L, 3, 3)
    return torch.einsum("blfi,blf->bli", lmk_vertices, lmk_bary_coords.to(vertices.dtype))


def rotation_yaw_degrees(rot_mats: torch.Tensor) -> torch.Tensor:
    """Yaw of (B, 3, 3) rotations in degrees, ``atan2(-R[2,0], sqrt(R[0,0]^2 + R[1,0]^2))``."""
    sy = torch.sqrt(rot_mats[:, 0, 0] ** 2 + rot_mats[:, 1, 0] ** 2)
    return torch.atan2(-rot_mats[:, 2, 0], sy) * 180.0 / torch.pi
