"""The FLAME head model as a ``torch.nn.Module``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..errors import AssetError
from .assets import load_flame_model, load_landmark_embedding
from .lbs import batch_rodrigues, lbs, rotation_yaw_degrees, vertices2landmarks

__all__ = ["FLAME", "FLAMEOutput", "NOW_LANDMARK_INDICES", "NUM_SHAPE_FILE"]

#: iBUG-68 indices of the 7 NoW landmarks: right eye outer/inner, left eye inner/outer,
#: subnasale, right and left mouth corners (subject's right/left).
NOW_LANDMARK_INDICES = (36, 39, 42, 45, 33, 48, 54)

#: Identity columns of a FLAME basis; the columns after them are expression.
NUM_SHAPE_FILE = 300

#: Joint order of FLAME's kinematic tree.
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")


@dataclass
class FLAMEOutput:
    """Result of a FLAME forward pass; all coordinates in metres.

    Attributes:
        vertices: (B, V, 3) posed vertices.
        joints: (B, 5, 3) posed joints [global, neck, jaw, left eye, right eye].
        landmarks68: (B, 68, 3) iBUG-68 landmarks from the full (static) embedding, or
            ``None`` without a landmark embedding.
        landmarks68_dynamic: (B, 68, 3) 17 pose-dependent contour + 51 static landmarks.
        landmarks7: (B, 7, 3) the NoW landmarks, ``landmarks68[:, NOW_LANDMARK_INDICES]``.
    """

    vertices: torch.Tensor
    joints: torch.Tensor
    landmarks68: torch.Tensor | None = None
    landmarks68_dynamic: torch.Tensor | None = None
    landmarks7: torch.Tensor | None = None


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


class FLAME(nn.Module):
    """FLAME: template + identity/expression blend shapes + pose correctives + LBS.

    Args:
        model_path: FLAME model file: FLAME2020 ``generic_model.pkl``, a FLAME2023 pkl,
            or an ``.npz`` with the same keys. Loaded without chumpy, through an
            allow-list unpickler (see :mod:`ofer.flame.assets`).
        landmark_embedding_path: DECA/MICA ``landmark_embedding.npy``; without it the
            output carries no landmarks.
        n_shape: identity coefficients used (<= 300).
        n_exp: expression coefficients used (<= the expression columns of the file, 100).
        dtype: ``torch.float32`` (default) or ``torch.float64`` for the exact path.

    All data buffers are registered with ``persistent=False``: the licensed FLAME data
    never enters a ``state_dict`` or a checkpoint.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        landmark_embedding_path: str | os.PathLike | None = None,
        n_shape: int = 300,
        n_exp: int = 100,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        data = load_flame_model(model_path)
        shapedirs = _dense(data["shapedirs"]).astype(np.float64)
        v_template = _dense(data["v_template"]).astype(np.float64)
        num_v = v_template.shape[0]
        if v_template.ndim != 2 or v_template.shape[1] != 3:
            raise AssetError(f"{model_path}: v_template has shape {v_template.shape}, expected (V, 3)")
        if shapedirs.ndim != 3 or shapedirs.shape[:2] != (num_v, 3):
            raise AssetError(f"{model_path}: shapedirs has shape {shapedirs.shape}, expected ({num_v}, 3, L)")
        n_exp_file = shapedirs.shape[2] - NUM_SHAPE_FILE
        if not 0 <= n_shape <= NUM_SHAPE_FILE:
            raise AssetError(f"n_shape={n_shape} is out of range: FLAME has {NUM_SHAPE_FILE} identity coefficients")
        if not 0 <= n_exp <= max(n_exp_file, 0):
            raise AssetError(f"n_exp={n_exp} is out of range: {model_path} has {max(n_exp_file, 0)} expression coefficients")
        self.n_shape, self.n_exp = int(n_shape), int(n_exp)
        self.model_path = str(model_path)

        posedirs = _dense(data["posedirs"]).astype(np.float64)
        num_pose_basis = posedirs.shape[-1]
        posedirs = posedirs.reshape(-1, num_pose_basis).T
        J_regressor = _dense(data["J_regressor"]).astype(np.float64)
        parents = np.asarray(data["kintree_table"])[0].astype(np.float32).astype(np.int64)
        parents[0] = -1
        faces = _dense(data["f"]).astype(np.int64)
        weights = _dense(data["weights"]).astype(np.float64)
        num_j = parents.shape[0]
        if J_regressor.shape != (num_j, num_v) or weights.shape != (num_v, num_j) or posedirs.shape != (9 * (num_j - 1), 3 * num_v):
            raise AssetError(f"{model_path}: inconsistent FLAME arrays (J_regressor {J_regressor.shape}, "
                             f"weights {weights.shape}, posedirs {posedirs.shape})")

        def buf(name: str, value: np.ndarray, to_dtype: torch.dtype | None = dtype) -> None:
            t = torch.from_numpy(np.ascontiguousarray(value))
            self.register_buffer(name, t.to(to_dtype) if to_dtype is not None else t, persistent=False)

        basis = np.concatenate(
            [shapedirs[:, :, :n_shape], shapedirs[:, :, NUM_SHAPE_FILE:NUM_SHAPE_FILE + n_exp]], axis=2
        )
        buf("v_template", v_template)
        buf("shapedirs", basis)
        buf("posedirs", posedirs)
        buf("J_regressor", J_regressor)
        buf("lbs_weights", weights)
        buf("parents", parents, None)
        buf("faces", faces, None)

        self.has_landmarks = landmark_embedding_path is not None
        if self.has_landmarks:
            lmk = load_landmark_embedding(landmark_embedding_path)
            num_f = faces.shape[0]
            for key in ("static_lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx"):
                idx = lmk[key]
                if idx.size and (idx.min() < 0 or idx.max() >= num_f):
                    raise AssetError(f"{landmark_embedding_path}: {key} indexes faces outside the model's {num_f} faces")
            buf("static_lmk_faces_idx", lmk["static_lmk_faces_idx"].astype(np.int64).reshape(-1), None)
            buf("static_lmk_bary_coords", lmk["static_lmk_bary_coords"].reshape(-1, 3))
            buf("dynamic_lmk_faces_idx", lmk["dynamic_lmk_faces_idx"].astype(np.int64), None)
            buf("dynamic_lmk_bary_coords", lmk["dynamic_lmk_bary_coords"])
            buf("full_lmk_faces_idx", lmk["full_lmk_faces_idx"].astype(np.int64).reshape(-1), None)
            buf("full_lmk_bary_coords", lmk["full_lmk_bary_coords"].reshape(-1, 3))
            if self.full_lmk_faces_idx.numel() != 68 or self.static_lmk_faces_idx.numel() != 51:
                raise AssetError(f"{landmark_embedding_path}: expected 68 full and 51 static landmarks")

    # ------------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.v_template.dtype

    def _coeffs(self, x: torch.Tensor | None, width: int, name: str, batch: int) -> torch.Tensor:
        """Validate a (B, <=width) tensor; zero-pad it to ``width`` columns."""
        if x is None:
            return self.v_template.new_zeros(batch, width)
        if x.dim() != 2 or x.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch}, n), got {tuple(x.shape)}")
        if x.shape[1] > width:
            raise ValueError(f"{name} has {x.shape[1]} columns but this FLAME layer uses {width}")
        x = x.to(self.dtype)
        if x.shape[1] < width:
            x = torch.cat([x, x.new_zeros(batch, width - x.shape[1])], dim=1)
        return x

    def forward(
        self,
        shape_coeffs: torch.Tensor | None = None,
        exp_coeffs: torch.Tensor | None = None,
        global_pose: torch.Tensor | None = None,
        neck_pose: torch.Tensor | None = None,
        jaw_pose: torch.Tensor | None = None,
        eye_pose: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> FLAMEOutput:
        """Evaluate FLAME.

        Args:
            shape_coeffs: (B, <=n_shape) identity coefficients (beta); missing columns are 0.
            exp_coeffs: (B, <=n_exp) expression coefficients (psi).
            global_pose, neck_pose, jaw_pose: (B, 3) axis-angle.
            eye_pose: (B, 6) axis-angle of the left and right eye.
            batch_size: used only when every input is omitted (default 1).

        Omitted inputs are zeros. Returns a :class:`FLAMEOutput` in metres.
        """
        given = [x for x in (shape_coeffs, exp_coeffs, global_pose, neck_pose, jaw_pose, eye_pose) if x is not None]
        B = given[0].shape[0] if given else (batch_size or 1)
        betas = torch.cat(
            [self._coeffs(shape_coeffs, self.n_shape, "shape_coeffs", B), self._coeffs(exp_coeffs, self.n_exp, "exp_coeffs", B)],
            dim=1,
        )
        poses = [
            self._pose(global_pose, 3, "global_pose", B),
            self._pose(neck_pose, 3, "neck_pose", B),
            self._pose(jaw_pose, 3, "jaw_pose", B),
            self._pose(eye_pose, 6, "eye_pose", B),
        ]
        full_pose = torch.cat(poses, dim=1)
        vertices, joints = lbs(
            betas, full_pose, self.v_template, self.shapedirs, self.posedirs,
            self.J_regressor, self.parents, self.lbs_weights,
        )
        out = FLAMEOutput(vertices=vertices, joints=joints)
        if self.has_landmarks:
            out.landmarks68 = self.landmarks68_of(vertices)
            out.landmarks7 = out.landmarks68[:, list(NOW_LANDMARK_INDICES)]
            dyn_faces, dyn_bary = self._dynamic_contour(full_pose)
            faces_idx = torch.cat([dyn_faces, self.static_lmk_faces_idx.unsqueeze(0).expand(B, -1)], dim=1)
            bary = torch.cat([dyn_bary, self.static_lmk_bary_coords.unsqueeze(0).expand(B, -1, -1)], dim=1)
            out.landmarks68_dynamic = vertices2landmarks(vertices, self.faces, faces_idx, bary)
        return out

    def landmarks68_of(self, vertices: torch.Tensor) -> torch.Tensor | None:
        """The full-embedding iBUG-68 landmarks ``(B, 68, 3)`` of meshes ``(B, V, 3)`` of this
        topology on this layer's device (as ``forward``'s ``landmarks68``); ``None`` without a
        landmark embedding."""
        if not self.has_landmarks:
            return None
        return vertices2landmarks(vertices, self.faces, self.full_lmk_faces_idx, self.full_lmk_bary_coords)

    def _pose(self, x: torch.Tensor | None, width: int, name: str, batch: int) -> torch.Tensor:
        if x is None:
            return self.v_template.new_zeros(batch, width)
        if x.shape != (batch, width):
            raise ValueError(f"{name} must have shape ({batch}, {width}), got {tuple(x.shape)}")
        return x.to(self.dtype)

    def _dynamic_contour(self, full_pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the 17 contour landmarks from the yaw look-up table.

        The yaw is that of ``R_global @ R_neck`` (the neck kinematic chain), negated and
        quantised to whole degrees as in DECA/smplx: 0..39 map to rows 0..39, -1..-39 to
        rows 40..78, and anything below -39 to row 78.
        """
        B = full_pose.shape[0]
        rots = batch_rodrigues(full_pose[:, :6].reshape(-1, 3)).view(B, 2, 3, 3)
        rel = torch.bmm(rots[:, 0], rots[:, 1])  # R_global @ R_neck
        yaw = torch.round(torch.clamp(-rotation_yaw_degrees(rel), max=39)).to(torch.long)
        idx = torch.where(yaw < 0, torch.where(yaw < -39, torch.full_like(yaw, 78), 39 - yaw), yaw)
        return self.dynamic_lmk_faces_idx[idx], self.dynamic_lmk_bary_coords[idx]

    def extra_repr(self) -> str:
        return f"vertices={self.num_vertices}, n_shape={self.n_shape}, n_exp={self.n_exp}, landmarks={self.has_landmarks}"
