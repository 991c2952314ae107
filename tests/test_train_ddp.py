"""DistributedDataParallel on CPU (gloo): 2 processes == 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ofer.models.checkpoint import read_checkpoint
from ofer.train.loop import run_training

from _train_helpers import ToyData, ToyTask, one_thread, toy_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
OVERRIDES = {"train.max_steps": STEPS, "train.ckpt_every": 3, "data.actors_per_batch": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ofer.device import cleanup

    try:
        torch.manual_seed(0)
        res = run_training(toy_config(run_dir, **OVERRIDES), ToyTask(noise=False, bn=False), ToyData())
        Path(run_dir, f"losses{rank}.json").write_text(json.dumps(res.losses))
    finally:
        cleanup()


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.manual_seed(0)
    single = run_training(toy_config(tmp_path / "one", **OVERRIDES), ToyTask(noise=False, bn=False),
                          ToyData())
    run = tmp_path / "two"
    # fork (where available) spares each worker a fresh interpreter and torch import (seconds);
    # the workers use one intra-op thread, as this process does here
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(2, _free_port(), str(run)), nprocs=2, join=True, start_method=method)
    l0 = json.loads((run / "losses0.json").read_text())
    l1 = json.loads((run / "losses1.json").read_text())
    assert l0 == l1  # every rank logs the all-reduced global loss
    assert len(l0) == STEPS
    for a, b in zip(l0, single.losses):
        assert abs(a - b) < 1e-5 * max(1.0, abs(b))
    a = read_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")["model"]
    b = read_checkpoint(run / "checkpoints" / "latest.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:  # saved from the unwrapped module: no "module." prefix
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
