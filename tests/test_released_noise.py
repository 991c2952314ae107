"""``noise: released``: the released test script's random stream, replayed call by call."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ofer.sample.released_noise import ReleasedNoise


def _seed_everything(r: int) -> None:
    random.seed(r)
    np.random.seed(r)
    torch.manual_seed(r)


def _script_sampler(rows: int, dim: int, ddim: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The released sampler's draws, with the global generators it used."""
    x_T = torch.randn(size=(rows, dim))
    np.random.randint(0, rows)
    visits = list(reversed(range(-1, 1000, 4))) if ddim else list(reversed(range(0, 1000)))
    steps = [torch.normal(0, 1, size=(rows, dim)) for t in visits if t > 0]
    return x_T, steps


def _script_run(n_images: int) -> list[dict]:
    """What the released script draws for its first images (legacy DDIM IdGen, DDPM ExpGen)."""
    with torch.random.fork_rng(devices=[]):
        state = np.random.get_state()
        try:
            _seed_everything(1)
            _seed_everything(np.random.randint(1000))  # before the image loop
            out = []
            for _ in range(n_images):
                id_x, _ = _script_sampler(100, 300, ddim=True)
                _seed_everything(np.random.randint(1000))  # before ExpGen
                ex_x, ex_steps = _script_sampler(100, 53, ddim=False)
                out.append({"id": id_x, "ex": ex_x, "ex_steps": torch.stack(ex_steps)})
        finally:
            np.random.set_state(state)
    return out


def test_released_stream_matches_the_script_call_by_call():
    ref = _script_run(3)
    rn = ReleasedNoise(100, 300, 100, 53)
    for k, r in enumerate(ref):
        got = rn.next_image()
        assert torch.equal(got["idgen"]["x_T"], r["id"]), k
        assert "noise" not in got["idgen"]  # legacy DDIM ignores its draws
        assert torch.equal(got["expgen"]["x_T"], r["ex"]), k
        assert torch.equal(got["expgen"]["noise"], r["ex_steps"]), k
    # the script's seeds: 1, the loop's, then one per image (NumPy's legacy stream)
    rs = np.random.RandomState(1)
    loop = rs.randint(1000)
    assert rn.seeds[:2] == [1, loop]
    rs = np.random.RandomState(loop)
    rs.randint(0, 100)
    assert rn.seeds[2] == rs.randint(1000)
    assert len(rn.seeds) == 5


def test_batches_concatenate_images_in_order_and_retries_reuse():
    a = ReleasedNoise(4, 3, 5, 2)
    one = [a.next_image() for _ in range(3)]
    b = ReleasedNoise(4, 3, 5, 2)
    batch = b.for_images(["x", "y"])
    assert batch["idgen"]["x_T"].shape == (8, 3) and batch["expgen"]["noise"].shape == (999, 10, 2)
    assert torch.equal(batch["idgen"]["x_T"][4:], one[1]["idgen"]["x_T"])
    assert torch.equal(batch["expgen"]["noise"][:, :5], one[0]["expgen"]["noise"])
    # a failed batch retried image by image gets the same noise, then the stream goes on
    assert torch.equal(b.for_images(["y"])["expgen"]["x_T"], one[1]["expgen"]["x_T"])
    assert torch.equal(b.for_images(["x"])["idgen"]["x_T"], one[0]["idgen"]["x_T"])
    assert torch.equal(b.for_images(["z"])["idgen"]["x_T"], one[2]["idgen"]["x_T"])


def test_other_samplers_are_refused():
    with pytest.raises(ValueError, match="released samplers"):
        ReleasedNoise(4, 3, 5, 2, idgen_method="dpmpp_2m")


@pytest.mark.slow
def test_runner_with_released_noise(setup, tmp_path):
    """The runner hands each image the stream's next noise, whatever the batch size."""
    from ofer.sample import run
    from tests.test_pipeline import _cfg

    _, images, ov = setup
    common = ["preset=faithful", "noise=released", "idgen_steps=null", "expgen_steps=null", "preview=false",
              "uncertainty.meshes=false"]
    outs = {}
    for bs in (1, 3):
        out = tmp_path / f"b{bs}"
        summary = run(_cfg(ov, *common, f"batch_size={bs}"), images, out, log=lambda *a: None)
        assert summary["ok"] == 4
        outs[bs] = {n: np.load(out / n / "samples.npz") for n in ("a", "b", "sub/c", "sub/d")}
    seeded = tmp_path / "seeded"
    run(_cfg(ov, *common[:1], *common[2:], "batch_size=3"), images, seeded, log=lambda *a: None)
    for n, f in outs[1].items():
        # the same noise; batched arithmetic differs in the last bits only
        assert np.allclose(f["shape_coeffs"], outs[3][n]["shape_coeffs"], atol=1e-4)
        assert np.allclose(f["exp_coeffs"], outs[3][n]["exp_coeffs"], atol=1e-4)
        assert not np.allclose(f["shape_coeffs"], np.load(seeded / n / "samples.npz")["shape_coeffs"])
    from ofer.config import ConfigError

    with pytest.raises(ConfigError, match="released samplers"):
        _cfg(ov, "noise=released")  # the fast preset's samplers


from tests.test_pipeline import setup  # noqa: E402,F401  (the tiny models and images)
