"""The reconstructor's replay hook: given noise in, every intermediate out."""

from __future__ import annotations

import pytest
import torch

from ofer.flame import FLAME
from ofer.models import ConditionedModel
from tests.test_pipeline import N_EXP, N_SHAPE, _cfg, _tiny_models


@pytest.fixture(scope="module")
def rec(synthetic_flame_paths):
    from ofer.sample import Reconstructor

    models = _tiny_models(synthetic_flame_paths, seed=3)
    cm = {k: ConditionedModel(h, a, f).eval() for k, (h, a, f) in models.items()}
    cfg = _cfg(["preset=faithful", "device=cpu", "n_identities=6", "n_expressions=5", "save_expressions=2",
                "idgen_sampler=ddim", "idgen_steps=6", "expgen_sampler=ddpm", "checkpoints.ranker_vertex_indices=null"])
    flame = FLAME(synthetic_flame_paths.model, synthetic_flame_paths.landmarks, n_shape=N_SHAPE, n_exp=0)
    flame_e = FLAME(synthetic_flame_paths.model, None, n_shape=N_SHAPE, n_exp=N_EXP)
    return Reconstructor(cm["idgen"], cm["idrank"], cm["expgen"], flame, flame_e, cfg, torch.device("cpu"))


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.rand(2, 3, 112, 112, generator=g) * 2 - 1, torch.rand(2, 3, 224, 224, generator=g)


def test_intermediates_are_what_the_results_were_made_of(rec):
    arc, farl = _inputs()
    res, mid = rec.reconstruct(arc, farl, [4, 9], return_intermediates=True)
    assert mid["shapes"].shape == (2, 6, N_SHAPE) and mid["scores"].shape == (2, 6)
    assert mid["expgen_samples"].shape == (2, 5, N_EXP + 3)
    for i, r in enumerate(res):
        assert torch.equal(mid["shapes"][i], r.shape_coeffs)
        assert torch.equal(mid["scores"][i], r.scores)
        assert int(mid["ranked"][i]) == r.ranked_index == int(r.scores.argmax())
        exp, jaw = rec.expgen.head.split(mid["expgen_samples"][i])
        assert torch.equal(exp, r.exp_coeffs) and torch.equal(jaw, r.jaw_pose)
    # the conditions are the condition builder's (the ranker's ArcFace one image at a time)
    with torch.inference_mode():
        assert torch.allclose(mid["conditions"]["idgen"], rec.idgen.condition(arc, farl), atol=1e-6)
        assert torch.allclose(mid["conditions"]["expgen"], rec.expgen.condition(arc, farl), atol=1e-6)
    # and the plain call returns the same results
    again = rec.reconstruct(arc, farl, [4, 9])
    assert torch.equal(again[1].shape_coeffs, res[1].shape_coeffs)


def test_given_noise_replays_and_is_what_the_samplers_use(rec):
    arc, farl = _inputs()
    g = torch.Generator().manual_seed(11)
    id_xT = torch.randn(2, 6, N_SHAPE, generator=g)
    ex_xT = torch.randn(2 * 5, N_EXP + 3, generator=g)
    steps = torch.randn(999, 2 * 5, N_EXP + 3, generator=g)
    noise = {"idgen": {"x_T": id_xT}, "expgen": {"x_T": ex_xT, "noise": lambda k: steps[k]}}
    res, mid = rec.reconstruct(arc, farl, [0, 1], noise=noise, return_intermediates=True)
    # independent of the seeds and image indices once the noise is given
    res2, mid2 = rec.reconstruct(arc, farl, [7, 3], noise={"idgen": {"x_T": id_xT},
                                                           "expgen": {"x_T": ex_xT, "noise": steps}},
                                 return_intermediates=True)
    assert torch.equal(mid["shapes"], mid2["shapes"]) and torch.equal(mid["expgen_samples"], mid2["expgen_samples"])
    # the heads sampled from exactly that noise
    with torch.inference_mode():
        ref_id = rec.idgen.head.sample(mid["conditions"]["idgen"], 6, method="ddim", steps=6, x_T=id_xT, seed=0)
        ref_ex = rec.expgen.head.sample(mid["conditions"]["expgen"], 5, method="ddpm", x_T=ex_xT, noise=steps, seed=0)
    assert torch.allclose(mid["shapes"], ref_id, atol=1e-5)
    assert torch.allclose(mid["expgen_samples"], ref_ex, atol=1e-5)
    # other per-step noise moves ExpGen's samples; the seeded run differs from the given noise
    res3, mid3 = rec.reconstruct(arc, farl, [0, 1], noise={"expgen": {"x_T": ex_xT, "noise": steps * 0.5}},
                                 return_intermediates=True)
    assert not torch.allclose(mid3["expgen_samples"], mid["expgen_samples"])
    assert not torch.allclose(mid3["shapes"], mid["shapes"])


def test_noise_keys_are_checked(rec):
    arc, farl = _inputs()
    with pytest.raises(ValueError, match="per generator"):
        rec.reconstruct(arc, farl, [0, 1], noise={"idrank": {}})
    with pytest.raises(ValueError, match="x_T"):
        rec.reconstruct(arc, farl, [0, 1], noise={"idgen": {"seed": 3}})
