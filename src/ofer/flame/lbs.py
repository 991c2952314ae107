"""Linear blend skinning for FLAME, as pure functions.

A FLAME mesh is posed in four steps: the shape and expression blend shapes give the rest
shape; the joints are regressed from that rest shape; pose correctives, linear in the
entries of ``R_j - I`` for every joint but the root, are added; and each vertex is moved
by the skinning-weighted blend of the joints' rigid transforms along the kinematic chain.
Poses are axis-angle vectors. The numerics (including the ``1e-8`` offset in the
Rodrigues angle) agree with the FLAME layers of DECA, MICA and OFER to float rounding.
"""

from __future__ import annotations

import torch

__all__ = [
    "batch_rodrigues",
    "blend_shapes",
    "vertices2joints",
    "batch_rigid_transform",
    "lbs",
    "vertices2landmarks",
    "rotation_yaw_degrees",
]


def _cross_matrix(v: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` vectors -> ``(N, 3, 3)`` matrices ``[v]x`` with ``[v]x u = v x u``."""
    x, y, z = v.unbind(dim=-1)
    o = torch.zeros_like(x)
    rows = (torch.stack([o, -z, y], dim=-1), torch.stack([z, o, -x], dim=-1), torch.stack([-y, x, o], dim=-1))
    return torch.stack(rows, dim=-2)


def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors to rotation matrices, ``R = I + sin(a) K + (1 - cos(a)) K^2``.

    Args:
        rot_vecs: (N, 3) axis-angle vectors (radians).

    Returns:
        (N, 3, 3) rotation matrices. ``K`` is the cross-product matrix of the unit axis
        ``r / a``. The angle ``a`` is measured on ``r + 1e-8`` (every component), so it never
        vanishes: the axis is finite everywhere, a zero vector gives exactly the identity,
        and the gradient at zero is finite.
    """
    angle = (rot_vecs + 1e-8).norm(dim=1, keepdim=True)  # (N, 1)
    K = _cross_matrix(rot_vecs / angle)
    sin_a = angle.sin().unsqueeze(-1)
    versin_a = (1 - angle.cos()).unsqueeze(-1)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)
    return eye + sin_a * K + versin_a * torch.matmul(K, K)


def blend_shapes(betas: torch.Tensor, shape_disps: torch.Tensor) -> torch.Tensor:
    """Linear blend shapes: (B, L) coefficients x (V, 3, L) basis -> (B, V, 3) offsets."""
    return torch.einsum("vcl,bl->bvc", shape_disps, betas)


def vertices2joints(J_regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Regress joints: (J, V) regressor x (B, V, 3) vertices -> (B, J, 3)."""
    return torch.einsum("bvc,jv->bjc", vertices, J_regressor)


def _rigid(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` rotations and ``(..., 3)`` translations -> ``(..., 4, 4)`` homogeneous transforms."""
    upper = torch.cat([rotation, translation.unsqueeze(-1)], dim=-1)  # (..., 3, 4)
    last_row = torch.zeros_like(upper[..., :1, :])
    last_row[..., 0, 3] = 1
    return torch.cat([upper, last_row], dim=-2)


def batch_rigid_transform(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose the kinematic chain.

    Joint ``j`` turns by ``rot_mats[:, j]`` about its rest location; its world transform is
    its parent's world transform composed with the local one, ``W_j = W_p [R_j | x_j - x_p]``
    (the root: ``[R_0 | x_0]``).

    Args:
        rot_mats: (B, J, 3, 3) local joint rotations.
        joints: (B, J, 3) rest-pose joint locations.
        parents: (J,) int64 parent indices, ``parents[0] == -1``; parents precede children.

    Returns:
        posed_joints (B, J, 3), the translations of ``W_j``, and skinning transforms
        (B, J, 4, 4): ``W_j`` acting about the rest joint, ``x -> R_w (x - x_j) + t_w``, which is
        what moves a rest-pose vertex rigidly with joint ``j``.
    """
    world: list[torch.Tensor] = []
    for j, p in enumerate(parents.tolist()):
        if p < 0:
            world.append(_rigid(rot_mats[:, j], joints[:, j]))
        else:
            world.append(torch.matmul(world[p], _rigid(rot_mats[:, j], joints[:, j] - joints[:, p])))
    world_tf = torch.stack(world, dim=1)  # (B, J, 4, 4)
    world_rot, posed_joints = world_tf[..., :3, :3], world_tf[..., :3, 3]
    about_rest = posed_joints - torch.matmul(world_rot, joints.unsqueeze(-1)).squeeze(-1)
    return posed_joints, _rigid(world_rot, about_rest)


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
    n_batch = betas.shape[0]
    rest = v_template if v_template.dim() == 3 else v_template.unsqueeze(0)

    # identity and expression: the rest shape of this face
    shaped = rest + blend_shapes(betas, shapedirs)
    # pose correctives, linear in R_j - I of every non-root joint (9 entries each, row-major)
    rotations = batch_rodrigues(full_pose.reshape(-1, 3)).reshape(n_batch, -1, 3, 3)
    eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
    pose_feature = (rotations[:, 1:] - eye).flatten(start_dim=1)
    corrected = shaped + torch.matmul(pose_feature, posedirs).reshape(n_batch, -1, 3)
    # joints come from the shaped mesh, before any pose-dependent change
    rest_joints = vertices2joints(J_regressor, shaped)
    posed_joints, joint_tf = batch_rigid_transform(rotations, rest_joints, parents)
    # each vertex moves by its own weighted blend of the joints' (3, 4) transforms
    vertex_tf = torch.einsum("vj,bjmn->bvmn", lbs_weights, joint_tf[..., :3, :])  # (B, V, 3, 4)
    moved = torch.matmul(vertex_tf[..., :3], corrected.unsqueeze(-1)).squeeze(-1) + vertex_tf[..., 3]
    return moved, posed_joints


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
