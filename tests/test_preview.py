"""The one-row preview: layout, keypoints, and that different hypotheses look different."""

from __future__ import annotations

import numpy as np
import torch

from ofer.sample.preview import CELL, color_scale, method_preview, spread_scale
from ofer.sample.reconstructor import ImageResult
from ofer.uncertainty import colorize, vertex_spread


def _result(flame, exp: torch.Tensor) -> ImageResult:
    shape = torch.zeros(1, 300, dtype=torch.float64)
    out = flame(shape_coeffs=shape)
    ev = flame(shape_coeffs=shape.expand(len(exp), -1), exp_coeffs=exp).vertices
    isp = torch.linspace(0, 2, out.vertices.shape[1])
    return ImageResult(
        shape_coeffs=shape.float(), scores=torch.zeros(1), ranked_index=0, identity_vertices=out.vertices[0],
        worst_vertices=out.vertices[0], landmarks68=out.landmarks68[0], landmarks7=out.landmarks7[0],
        exp_coeffs=exp.float(), jaw_pose=torch.zeros(len(exp), 3), expression_vertices=ev[:0],
        identity_spread=isp, topk_spread=isp, expression_spread=vertex_spread(ev) * 1000, top_k=1,
        chosen_index=list(range(len(exp))), chosen_vertices=ev, expression_mean=ev.mean(0),
        uncertainty={"n_identities": 1, "n_expressions": len(exp)})


def _cells(img: np.ndarray, n: int) -> list[np.ndarray]:
    """The n cells of a preview row (labels cut off)."""
    return [img[18:18 + CELL, 2 + k * (CELL + 2):2 + k * (CELL + 2) + CELL].astype(float) for k in range(n)]


def test_row_layout_keypoints_and_visible_differences(synthetic_flame):
    exp = torch.zeros(3, 100, dtype=torch.float64)
    exp[1, 0] = 3.0  # a strong first component (the synthetic head's smile / jaw-like mode)
    exp[2, 1] = 3.0
    res = _result(synthetic_flame, exp)
    image = np.full((100, 120, 3), 128, np.uint8)
    kps = np.array([[40, 40], [80, 40], [60, 60], [45, 80], [75, 80]], float)
    faces = synthetic_flame.faces.numpy()
    img = method_preview(res, faces, np.zeros((224, 224, 3), np.uint8), image, kps, title="a.png")
    n = 2 + 1 + 1 + 3 + 1 + 1  # input, crop, identity, its spread, 3 hypotheses, their spread, scale
    assert img.shape == (CELL + 16 + 4, n * (CELL + 2) + 2, 3)  # one row, nothing wrapped
    cells = _cells(img, n)
    # the keypoints are drawn on the (grey) input: coloured pixels appear
    assert (np.ptp(cells[0], axis=2) > 60).sum() > 5 * 9
    hyp = cells[4:7]
    # each pair differs clearly (by more than 20 grey levels) on a visible share of the cell
    changed = [(np.abs(hyp[a] - hyp[b]).max(axis=2) > 20).mean() for a, b in ((0, 1), (0, 2), (1, 2))]
    assert min(changed) > 0.01, changed
    # the same hypothesis twice renders the same cell
    same = _result(synthetic_flame, exp[[1, 1]])
    c = _cells(method_preview(same, faces, np.zeros((224, 224, 3), np.uint8)), 7)
    assert np.abs(c[3] - c[4]).max() == 0
    # without the input image the row starts with the crop
    assert c[0].mean() == 0.0


def test_colour_scale_cell_and_scale_choice():
    cell = color_scale([("identity", 2.0), ("expression", 5.0)])
    assert cell.shape == (CELL, CELL, 3)
    top, bottom = colorize(np.array([1.0, 0.0]), 1.0)
    # the bars show the colour map from the top of the scale (up) to zero (down)
    col = cell[:, 16 + 3]
    assert any((abs(col.astype(int) - top) <= 2).all(1)) and any((abs(col.astype(int) - bottom) <= 2).all(1))
    assert spread_scale(np.linspace(0, 3.3, 1000)) == 4.0 and spread_scale(np.ones(5), 7.0) == 7.0
