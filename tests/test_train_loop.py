"""Training loop: overfitting, exact resume, kill -9 safety, NaN guard, EMA, LR schedule."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ofer.errors import ConfigError
from ofer.models.checkpoint import read_checkpoint
from ofer.train.ema import EMA
from ofer.train.loop import TrainingDiverged, lr_factor, run_training

from _train_helpers import ToyData, ToyTask, one_thread, toy_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent


def _fresh_task(**kw):
    torch.manual_seed(0)
    return ToyTask(**kw)


def test_overfits_one_batch(tmp_path):
    data = ToyData(n=4, k=2)  # one batch of 4 actors
    cfg = toy_config(tmp_path, **{"train.max_steps": 150, "train.ckpt_every": 0})
    res = run_training(cfg, _fresh_task(noise=False), data)
    assert len(res.losses) == 150
    assert sum(res.losses[-10:]) / 10 < 0.5 * sum(res.losses[:10]) / 10


def test_resume_reproduces_the_loss_curve_exactly(tmp_path):
    data = ToyData()
    full = run_training(toy_config(tmp_path / "a", **{"train.max_steps": 10}), _fresh_task(), data)
    first = run_training(toy_config(tmp_path / "b", **{"train.max_steps": 5, "train.ckpt_every": 5}),
                         _fresh_task(), data)
    # a differently initialised model: everything must come from the checkpoint
    torch.manual_seed(123)
    second = run_training(toy_config(tmp_path / "b", **{"train.max_steps": 10, "resume": "true"}),
                          ToyTask(), data)
    assert first.losses + second.losses == full.losses
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "latest.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 10 and a["kind"] == "idgen"
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert set(a) >= {"model", "ema", "optimizer", "step", "config", "version", "rng"}
    assert a["config"]["train"]["max_steps"] == 10
    assert (tmp_path / "a" / "config.yaml").is_file()


def test_frozen_parameters_are_not_optimised(tmp_path):
    task = _fresh_task()
    before = task.model.frozen.weight.clone()
    run_training(toy_config(tmp_path, **{"train.max_steps": 3}), task, ToyData())
    ck = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    groups = ck["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["encoder", "diffusion"]
    n_encoder = sum(1 for p in task.model.encoder.parameters())
    assert len(groups[0]["params"]) == n_encoder  # the frozen Linear is left out
    assert torch.equal(task.model.frozen.weight, before)


def test_ema_tracks_only_the_denoiser(tmp_path):
    task = _fresh_task()
    run_training(toy_config(tmp_path, **{"train.max_steps": 4, "ema.decay": 0.5}), task, ToyData())
    ck = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    for name, v in ck["model"].items():
        if name.startswith("encoder."):
            assert torch.equal(ck["ema"][name], v)
    assert any(not torch.equal(ck["ema"][n], ck["model"][n]) for n in ck["model"] if n.startswith("generator."))


def test_ema_update_formula():
    m = torch.nn.Linear(2, 1)
    ema = EMA(m, decay=0.75)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], 0.75 * w0 + 0.25 * (w0 + 1))
    with ema.swapped_in(m):
        assert torch.equal(m.weight, ema.shadow["weight"])
    assert torch.equal(m.weight, w0 + 1)


def test_lr_factor():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant") == 1.0 and lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, **{"train.max_steps": 10, "train.ckpt_every": 1})
    with pytest.raises(TrainingDiverged) as e:
        run_training(cfg, _fresh_task(nan_at=4), ToyData())
    msg = str(e.value)
    assert msg.startswith("non-finite loss at step 3 (nan); stopped, the last good checkpoint is ")
    assert "\n" not in msg
    ck = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert ck["step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_best_checkpoint_follows_validation(tmp_path):
    cfg = toy_config(tmp_path, **{"train.max_steps": 6, "train.val_every": 2})
    res = run_training(cfg, _fresh_task(), ToyData(), val_set=ToyData(n=3, seed=5))
    best = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["best_metric"] == pytest.approx(res.best_metric)
    assert math.isfinite(res.best_metric) and "val/err" in res.metrics


KILL_SCRIPT = """
import sys, time
sys.path[:0] = [{src!r}, {tests!r}]
import torch
from ofer.train.loop import run_training
from _train_helpers import ToyData, ToyTask, toy_config
torch.set_num_threads(1)  # as the test process
torch.manual_seed(0)
cfg = toy_config({run!r}, **{{"train.max_steps": 100000, "train.ckpt_every": 1}})
run_training(cfg, ToyTask(), ToyData(), on_step=lambda s, l: time.sleep(0.01))
"""


def test_kill_9_leaves_a_loadable_checkpoint_and_resume_matches(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "train_forever.py"
    script.write_text(KILL_SCRIPT.format(src=str(HERE.parent / "src"), tests=str(HERE), run=str(run)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    latest = run / "checkpoints" / "latest.pt"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if latest.is_file() and read_checkpoint(latest)["step"] >= 12:
                break
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode())
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of whatever it was doing
    finally:
        proc.wait()
    ck = read_checkpoint(latest)
    k = ck["step"]
    assert k >= 12
    resumed = run_training(toy_config(run, **{"train.max_steps": k + 4, "resume": "true"}),
                           ToyTask(), ToyData())
    torch.manual_seed(0)
    ref = run_training(toy_config(tmp_path / "ref", **{"train.max_steps": k + 4}), ToyTask(), ToyData())
    assert resumed.losses == ref.losses[k:]


def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    data = ToyData()
    run_training(toy_config(tmp_path, **{"train.max_steps": 4}), _fresh_task(), data)
    latest = (tmp_path / "checkpoints" / "latest.pt").resolve()
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kw):
        reads.append(Path(f).resolve() if isinstance(f, (str, os.PathLike)) else f)
        return real_load(f, *args, **kw)

    monkeypatch.setattr(torch, "load", counting_load)
    res = run_training(toy_config(tmp_path, **{"train.max_steps": 6, "resume": "true"}), _fresh_task(), data)
    assert res.step == 6 and len(res.losses) == 2  # it did resume, at step 4
    assert reads == [latest]


class _GradNaNTask(ToyTask):
    """A finite loss whose gradient is NaN from the ``bad_at``-th loss call on."""

    def __init__(self, bad_at: int):
        super().__init__()
        self.bad_at = bad_at

    def loss(self, model, batch, generator):
        loss, stats = super().loss(model, batch, generator)
        if self.calls >= self.bad_at:
            w = model.generator[0].weight
            # value 0 * sqrt(0) = 0; gradient 0 * 1 / (2 sqrt(0)) = NaN
            loss = loss + 0.0 * torch.sqrt(w - w.detach()).sum()
        return loss, stats


def test_nan_gradient_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, **{"train.max_steps": 10, "train.ckpt_every": 1, "train.tensorboard": "true"})
    torch.manual_seed(0)
    task = _GradNaNTask(bad_at=3)
    with pytest.raises(TrainingDiverged) as e:
        run_training(cfg, task, ToyData())
    assert str(e.value).startswith("non-finite gradient norm at step 2; stopped, the last good checkpoint is ")
    assert str(e.value).endswith(str(tmp_path / "checkpoints" / "latest.pt"))
    ck = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert ck["step"] == 2
    # the parameters are those of step 2: AdamW never stepped with the NaN gradient
    for name, v in task.model.named_parameters():
        assert torch.equal(v, ck["model"][name]), name
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    # nothing half-written is left behind
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "latest.pt"]


class _HugeStepTask(ToyTask):
    """A finite loss and gradient, but an update so large that the weights overflow."""

    def param_groups(self):
        return [{**g, "lr": math.inf} for g in super().param_groups()]


@pytest.mark.parametrize("ckpt_every", [1, 5])
def test_an_overflowing_update_stops_at_once_and_names_a_finite_checkpoint(tmp_path, ckpt_every):
    cfg = toy_config(tmp_path, **{"train.max_steps": 10, "train.ckpt_every": ckpt_every})
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match="non-finite weights after the update of step 0") as e:
        run_training(cfg, _HugeStepTask(), ToyData())
    latest = tmp_path / "checkpoints" / "latest.pt"
    assert not latest.exists()  # nothing was saved before the first step, and nothing after it
    assert str(e.value).endswith("stopped before any checkpoint was written")


def test_a_run_dir_holding_a_run_is_not_replaced_silently(tmp_path):
    torch.manual_seed(0)
    run_training(toy_config(tmp_path, **{"train.max_steps": 4}), ToyTask(), ToyData())
    before = (tmp_path / "checkpoints" / "latest.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run .*resume=true.*overwrite=true"):
        run_training(toy_config(tmp_path, **{"train.max_steps": 2}), ToyTask(), ToyData())
    assert (tmp_path / "checkpoints" / "latest.pt").read_bytes() == before
    res = run_training(toy_config(tmp_path, **{"train.max_steps": 2, "overwrite": "true"}), ToyTask(), ToyData())
    assert res.step == 2 and read_checkpoint(tmp_path / "checkpoints" / "latest.pt")["step"] == 2
    with pytest.raises(ConfigError, match="overwrite"):
        toy_config(tmp_path, **{"resume": "true", "overwrite": "true"})


def test_a_resumed_run_clears_temp_checkpoints_of_a_killed_one(tmp_path):
    torch.manual_seed(0)
    run_training(toy_config(tmp_path, **{"train.max_steps": 2}), ToyTask(), ToyData())
    stale = tmp_path / "checkpoints" / ".latest.pt.a1b2c3d4.tmp"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    run_training(toy_config(tmp_path, **{"train.max_steps": 4, "resume": "true"}), ToyTask(), ToyData())
    assert not stale.exists()
