"""The demo's child processes run on fixed torch thread counts, whatever the caller's environment.

CPU float reductions are split by thread, so a training run on another thread count ends
with other weights; torch takes its count from ``MKL_NUM_THREADS`` before
``OMP_NUM_THREADS``. The demo therefore sets both for every training run and for the
sampling step (``ofer.demo._thread_env``).
"""

from __future__ import annotations

import json
import subprocess
from importlib import resources
import sys
from pathlib import Path

import pytest
import torch

from ofer import demo

from _train_helpers import write_flame, write_world

REPO = Path(__file__).resolve().parents[1]
THREADS = "import torch; print(torch.get_num_threads())"


@pytest.fixture
def busy_caller(monkeypatch):
    """A caller whose environment asks for three threads through both variables."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("MKL_NUM_THREADS", "3")


@pytest.mark.parametrize("n", [1, 2])
def test_child_gets_the_pinned_thread_count(busy_caller, n):
    out = subprocess.run([sys.executable, "-c", THREADS], env=demo._thread_env(n), capture_output=True,
                         text=True, check=True)
    assert int(out.stdout) == n


def test_demo_pins_every_training_run_and_the_sampling(busy_caller, monkeypatch, tmp_path):
    seen: list[tuple[str, dict]] = []

    class Done:
        def __init__(self, cmd, env=None, **kw):  # the trainings: python -m ofer.train KIND ...
            seen.append((cmd[3], dict(env) if env is not None else None))

        def poll(self):
            return 0

    def fake_run(cmd, env=None, **kw):
        seen.append((cmd[2], dict(env) if env is not None else None))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(demo.subprocess, "Popen", Done)
    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    monkeypatch.setattr(demo, "world_report", lambda *a, **k: {"summary": {}, "per_image": []})
    monkeypatch.setattr(demo, "format_report", lambda rep: "report\n")
    assert demo.main(["--root", str(tmp_path)]) == 0
    env = dict(seen)
    assert set(env) == {"ofer.world", "idgen", "expgen", "idrank", "ofer.sample"}
    for kind in ("idgen", "expgen", "idrank"):
        assert env[kind]["OMP_NUM_THREADS"] == env[kind]["MKL_NUM_THREADS"] == str(demo.TRAIN_THREADS)
    assert env["ofer.sample"]["OMP_NUM_THREADS"] == env["ofer.sample"]["MKL_NUM_THREADS"] == str(demo.SAMPLE_THREADS)
    # the report records them with what else its last digits depend on
    recorded = json.loads((tmp_path / "report.json").read_text())["environment"]
    assert (recorded["train_threads"], recorded["sample_threads"]) == (demo.TRAIN_THREADS, demo.SAMPLE_THREADS)
    assert recorded["packages"]["torch"] == torch.__version__


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, "WORLDID_TRAIN", n_actors=8, n_images=2, seed=1)
    write_flame(root)
    return root


def _train_idgen(world: Path, run: Path, env: dict) -> dict:
    """A few steps of the demo IdGen (its packaged config) through the real trainer."""
    with resources.as_file(demo.config_file("idgen")) as config:
        cmd = [sys.executable, "-m", "ofer.train", "idgen", "--config", str(config), f"data_root={world}",
               f"run_dir={run}", "data.root=.", "data.val=[]", "train.max_steps=3", "train.val_every=0",
               "train.ckpt_every=0", "train.progress=false", "train.tensorboard=false", "train.device=cpu"]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return torch.load(run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_demo_training_weights_do_not_depend_on_the_callers_threads(tiny_world, tmp_path, monkeypatch):
    ref = _train_idgen(tiny_world, tmp_path / "ref", demo._thread_env(demo.TRAIN_THREADS))
    # the same run on two threads ends with other weights: the pin is what keeps them equal
    two = _train_idgen(tiny_world, tmp_path / "two", demo._thread_env(2))
    assert not _same(ref, two)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    again = _train_idgen(tiny_world, tmp_path / "again", demo._thread_env(demo.TRAIN_THREADS))
    assert _same(ref, again)
