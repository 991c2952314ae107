"""The out-of-the-box demo (``make demo``): the whole system on the synthetic world.

1. build a synthetic world (procedural FLAME-format heads, CPU renders, occluders) in the
   training layout (``python -m ofer.world``);
2. train small IdGen, ExpGen and IdRank models with the real trainers (``python -m ofer.train``)
   and the demo configs shipped with the package (``ofer/world/configs/*.yaml``);
3. sample the world's held-out test renders (``python -m ofer.sample``, what ``sample.py``
   runs; each scene clean, with a random occluder and with a face mask);
4. write previews and a report with the learning evidence (``ofer.world.report``).

Every step is cached: a re-run skips what is complete (the world, each finished training
run, every sampled image) and only recomputes the report. Each step runs the installed
package as a module and reads only the package's own configs, so the demo needs no checkout;
a relative ``--root`` is taken from the current directory.

    python -m ofer.demo [--root runs/demo] [--fresh]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .io import write_json, write_text
from .world.report import format_report, world_report

__all__ = ["main", "config_file", "CONFIG_KINDS"]

#: The demo configs, ``<kind>.yaml`` in the ``configs`` folder of this package (package data).
CONFIG_PACKAGE, CONFIG_FOLDER = "ofer.world", "configs"
CONFIG_KINDS = ("idgen", "expgen", "idrank", "sample")

#: World of the demo. Many identities with few small renders each: the tiny encoders are trained
#: from scratch and must generalise to held-out identities (300 identities did not suffice for a
#: plain regression of the shape from the crops). The identity prior puts its variance on 8
#: coefficients, most of it on those an aligned crop shows (head width and two local ones; not
#: the head height, which the 5-point alignment scales away); head poses stay within
#: +-15/8/5 degrees. 1500 identities x 2 renders (IdGen, IdRank), one
#: expression frame x 1 render per identity (ExpGen), 24 held-out test scenes x 3 variants
#: (``--identities`` / ``--test-scenes`` change the two counts), 128 px.
IDENTITIES, TEST_SCENES = 1500, 24
WORLD_ARGS = ["--images-per-identity", "2", "--expression-frames", "1",
              "--images-per-frame", "1", "--seed", "0", "--vertices", "2000",
              "--size", "128", "--occlusion-prob", "0.3", "--shape-sigma", "2,0.3,0.3,0.3,0.3,2,2,1",
              "--pose", "15,8,5", "--workers", "0"]

#: torch intra-op threads of each training run and of the sampling step. CPU float reductions
#: (matrix products, convolutions) are split differently for another thread count, and a
#: training run amplifies those last-bit differences into other weights, so the counts are
#: fixed here rather than left to the machine's core count or the caller's environment. Two
#: threads for sampling: what the documented report was sampled with (the default on the
#: 2-core development machine). The world builder fixes its own (one per process).
TRAIN_THREADS, SAMPLE_THREADS = 1, 2

def config_file(kind: str) -> Any:
    """The packaged demo config of ``kind`` (one of :data:`CONFIG_KINDS`), an
    ``importlib.resources`` traversable (``resources.as_file`` gives a path for a subprocess)."""
    if kind not in CONFIG_KINDS:
        raise ValueError(f"no demo config {kind!r}; the demo configs are {', '.join(CONFIG_KINDS)}")
    return resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER / f"{kind}.yaml"


def _thread_env(threads: int) -> dict[str, str]:
    """The environment with ``threads`` torch intra-op threads for a child process.

    Both variables are set: torch (with MKL and OpenMP) takes its thread count from
    ``MKL_NUM_THREADS`` before ``OMP_NUM_THREADS``, so a caller's ``MKL_NUM_THREADS`` would
    otherwise override ``OMP_NUM_THREADS``.
    """
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    return env


def _run(cmd: list[str], what: str, threads: int | None = None) -> None:
    print(f"[demo] {what}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_thread_env(threads) if threads else None)
    if r.returncode != 0:
        raise SystemExit(f"[demo] {what} failed (exit {r.returncode})")
    print(f"[demo] {what} took {time.perf_counter() - t0:.1f} s", flush=True)


def _world_cmd(world: Path, identities: int, test_scenes: int) -> list[str]:
    return [sys.executable, "-m", "ofer.world", "--output", str(world), "--identities", str(identities),
            "--test-identities", str(test_scenes), *WORLD_ARGS]


def _train_cmd(kind: str, config: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "ofer.train", kind, "--config", str(config), f"data_root={root / 'world'}",
            f"run_dir={root / kind}", "resume=true"]


def _sample_cmd(root: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "ofer.sample", "--input", str(root / "world" / "test" / "images"),
            "--output", str(root / "samples"), "--config", str(config), f"data_root={root}"]


def _train(jobs: list[tuple[str, Path] | tuple[str, Path, str]], root: Path, threads: int | None = None,
           nice: dict[str, int] | None = None) -> None:
    """Train the given ``(kind, config[, after])`` runs side by side (each skipped when done).

    A run with ``after`` starts once that run has finished (IdRank needs the IdGen
    checkpoint); the others start at once. ``threads``: torch threads per run
    (:func:`_thread_env`); the tiny demo models run faster on one thread each, side by side,
    than one after the other on two threads. ``nice``: a niceness increment per kind (POSIX
    only), so that the runs off the critical path yield the CPU to the one on it.
    """
    env = _thread_env(threads) if threads else dict(os.environ)
    t0 = time.perf_counter()
    waiting = [(j[0], j[1], j[2] if len(j) > 2 else None) for j in jobs]
    running: list[tuple[str, subprocess.Popen, Any]] = []
    finished: set[str] = set()
    failed: list[str] = []
    while waiting or running:
        for job in list(waiting):
            kind, config, after = job
            if after is not None and after not in finished:
                continue
            waiting.remove(job)
            if (root / f".{kind}.done").is_file():
                print(f"[demo] {kind}: trained before ({root / kind}), skipped")
                finished.add(kind)
                continue
            cmd = _train_cmd(kind, config, root)
            log = open(root / f"{kind}.log", "ab")
            print(f"[demo] training {kind}: {' '.join(cmd[1:])} (log: {root / f'{kind}.log'})", flush=True)
            inc = (nice or {}).get(kind, 0)
            pre = (lambda inc=inc: os.nice(inc)) if inc and hasattr(os, "nice") else None
            running.append((kind, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   preexec_fn=pre), log))
        for item in list(running):
            kind, p, log = item
            rc = p.poll()
            if rc is None:
                continue
            running.remove(item)
            log.close()
            if rc != 0:
                failed.append(f"{kind} (exit {rc}, see {root / f'{kind}.log'})")
                waiting = [w for w in waiting if w[2] != kind]  # what needs it cannot run
            else:
                (root / f".{kind}.done").write_text("done\n")
                finished.add(kind)
                print(f"[demo] training {kind} finished after {time.perf_counter() - t0:.1f} s", flush=True)
        if running:
            time.sleep(0.2)
        elif waiting and all(w[2] is not None and w[2] not in finished for w in waiting):
            failed += [f"{w[0]} (needs {w[2]}, which is neither done nor in this list)" for w in waiting]
            break
    if failed:
        raise SystemExit(f"[demo] training failed: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ofer.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs/demo", help="folder for the world, runs, samples and report")
    ap.add_argument("--fresh", action="store_true", help="delete the folder first and start over")
    ap.add_argument("--identities", type=int, default=IDENTITIES,
                    help=f"training identities of the world (default {IDENTITIES})")
    ap.add_argument("--test-scenes", type=int, default=TEST_SCENES,
                    help=f"held-out test scenes, each rendered in 3 variants (default {TEST_SCENES})")
    args = ap.parse_args(argv)
    root = Path(args.root).expanduser().resolve()  # a relative root is taken from the current directory
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        configs = {k: stack.enter_context(resources.as_file(config_file(k))) for k in CONFIG_KINDS}
        samples = _steps(args, root, configs)

    rep = world_report(samples, root / "world")
    rep["environment"] = _environment()
    text = format_report(rep)
    write_json(root / "report.json", rep)
    write_text(root / "report.md", text)
    _contact_sheet(samples, root / "previews.png")
    print(text)
    print(f"[demo] report: {root / 'report.md'}; previews: {root / 'previews.png'} and "
          f"{samples}/<image>/preview.png; total {time.perf_counter() - t_start:.1f} s")
    return 0


def _steps(args: argparse.Namespace, root: Path, configs: dict[str, Path]) -> Path:
    """World, training and sampling (each skipped when done); returns the samples folder."""
    world = root / "world"
    if (world / "world.json").is_file():
        built = json.loads((world / "world.json").read_text())["config"]
        if (built["identities"], built["test_identities"]) != (args.identities, args.test_scenes):
            raise SystemExit(f"[demo] {world} holds a world of {built['identities']} identities and "
                             f"{built['test_identities']} test scenes, not {args.identities} and "
                             f"{args.test_scenes}: add --fresh, or choose another --root")
        print(f"[demo] world: built before ({world}), skipped")
    else:
        _run(_world_cmd(world, args.identities, args.test_scenes), "building the synthetic world")

    # IdRank samples the trained IdGen, so it starts when IdGen is done, while ExpGen still runs.
    # ExpGen (1200 steps and a loader worker) is the longest: IdGen and IdRank yield to it.
    _train([("idgen", configs["idgen"]), ("expgen", configs["expgen"]), ("idrank", configs["idrank"], "idgen")],
           root, threads=TRAIN_THREADS, nice={"idgen": 10, "idrank": 10})

    _run(_sample_cmd(root, configs["sample"]), "sampling the held-out test images", threads=SAMPLE_THREADS)
    return root / "samples"


def _environment() -> dict[str, Any]:
    """What the report's last digits depend on beyond the seeds: CPU, kernels, packages, threads.

    Two reports are bit-equal only when these agree (docs/world.md, Demo).
    """
    import platform
    from importlib import metadata

    import torch

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "numpy", "pillow", "scipy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "cpu": cpu,
            "torch_cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
            "packages": versions,
            "train_threads": TRAIN_THREADS, "sample_threads": SAMPLE_THREADS}


def _contact_sheet(samples: Path, out: Path, count: int = 6) -> None:
    """Stack the first previews (one row each; the test scenes' variants come in name order,
    so two scenes clean, with an occluder and with a face mask) into one image."""
    import numpy as np
    from PIL import Image

    paths = sorted(samples.glob("*/preview.png"))[:count]
    if not paths:
        return
    ims = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    w = max(i.shape[1] for i in ims)
    ims = [np.pad(i, ((0, 0), (0, w - i.shape[1]), (0, 0)), constant_values=255) for i in ims]
    Image.fromarray(np.concatenate(ims, axis=0)).save(out)


if __name__ == "__main__":
    sys.exit(main())
