"""The training loop shared by IdGen, ExpGen and IdRank.

A :class:`TrainTask` says what the model is and how to compute the loss; :func:`run_training`
does everything else: AdamW parameter groups, EMA, bf16 autocast on GPU, gradient clipping,
the NaN/inf guard, DistributedDataParallel, TensorBoard scalars, periodic validation and
sample meshes, and checkpoints that resume exactly.

Exact resume. Every source of randomness in a step is a pure function of ``(seed, step,
rank)``: the batch (:class:`~ofer.data.datasets.StreamBatchSampler` keys), the item-level
augmentation (seeded per stream position), and the ``torch.Generator`` handed to the loss
(re-seeded every step). The learning rate is a function of the step. The checkpoint holds
the model, the EMA, the optimiser state, the step and the global torch RNG state, so a run
killed at any moment and restarted with ``resume=true`` reproduces the loss sequence of an
uninterrupted run (bit for bit on CPU).

Checkpoints (``<run_dir>/checkpoints/``, written atomically by rank 0): ``latest.pt`` every
``train.ckpt_every`` steps and at the end, ``best.pt`` whenever the validation metric (or,
without validation, the mean training loss since the previous checkpoint) improves. Contents:
``{"model", "ema", "optimizer", "step", "config", "kind", "version", "rng", "best_metric",
"best_metric_name"}`` (on resume, a ``best_metric`` of another metric is discarded).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..config import config_to_dict, save_config
from ..io import remove_stale_temps
from ..errors import CheckpointError, ConfigError, OferError
from ..models.checkpoint import read_checkpoint, save_checkpoint
from ..device import DistInfo, all_reduce_mean, any_flag, barrier, init_distributed
from .ema import EMA
from ..data.datasets import StreamBatchSampler

__all__ = [
    "TrainTask",
    "TrainResult",
    "TrainingDiverged",
    "run_training",
    "step_seed",
    "lr_factor",
    "flatten_views",
    "latest_checkpoint",
]

log = logging.getLogger("ofer.train")


class TrainingDiverged(OferError):
    """The loss or the gradient became NaN/inf; training stopped, the last checkpoint is kept."""


class TrainTask:
    """What :func:`run_training` needs to know about a model. Subclass and fill in.

    Attributes:
        kind: checkpoint kind (``"idgen"``, ``"expgen"``, ``"idrank"``).
        model: the module saved as ``"model"`` (everything that is trained).
        ema_prefixes: names of the submodules averaged by the EMA (None = all).
        num_steps: diffusion steps T, for the loss-by-timestep-quartile scalars (0 = none).
    """

    kind: str = "task"
    model: nn.Module
    ema_prefixes: Optional[Sequence[str]] = None
    num_steps: int = 0
    metric_name: str = "val/metric"

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups ``{"name", "params", "lr"}``; frozen parameters must be left out."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and per-example stats (``"loss"`` (B,), optionally ``"t"`` (B,))."""
        raise NotImplementedError

    def validate(self, model: nn.Module, dataset: Any, generator: torch.Generator) -> dict[str, float]:
        """Held-out metrics (lower ``metric_name`` is better). Runs on rank 0, EMA weights."""
        return {}

    def write_samples(self, model: nn.Module, dataset: Any, out_dir: Path,
                      generator: torch.Generator) -> None:
        """Write sample meshes (PLY) for a few items. Runs on rank 0, EMA weights."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    step: int
    losses: list[float] = field(default_factory=list)  # global mean loss of each step run here
    run_dir: Optional[Path] = None
    best_metric: float = math.inf
    metrics: dict[str, float] = field(default_factory=dict)
    data_seconds: float = 0.0
    compute_seconds: float = 0.0


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the loss generator at ``step`` on ``rank`` (a 63-bit mix)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(rank) * 0x94D049BB133111EB)
    x ^= x >> 31
    return x % (2**63 - 1)


def lr_factor(step: int, max_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of every group's base learning rate at ``step`` (0-based)."""
    f = 1.0
    if warmup > 0 and step < warmup:
        f = (step + 1) / warmup
    if schedule == "cosine":
        f *= 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max(max_steps, 1)))
    return f


def flatten_views(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B,K,...) -> (B*K,...) for every per-image tensor; ``index`` (B,) is repeated K times."""
    k = batch["arcface"].shape[1] if "arcface" in batch else 1
    out = {}
    for name, v in batch.items():
        if name == "index":
            out[name] = v.repeat_interleave(k)
        elif v.dim() >= 2:
            out[name] = v.flatten(0, 1)
        else:
            out[name] = v
    return out


def _all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every parameter is finite (one fused reduction per dtype and device)."""
    if not params:
        return True
    norms = torch._foreach_norm([p.detach() for p in params], 1)
    return bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms]).sum()))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    p = Path(run_dir) / "checkpoints" / "latest.pt"
    return p if p.is_file() else None


class _LossModule(nn.Module):
    """Puts ``task.loss`` behind ``forward`` so that DDP synchronises its gradients."""

    def __init__(self, task: TrainTask) -> None:
        super().__init__()
        self.model = task.model
        self._task = [task]  # not a submodule

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return self._task[0].loss(self.model, batch, generator)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    if not is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = str(run_dir / "log.txt")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(Path(path).resolve())
               for h in log.handlers):
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    log.setLevel(logging.INFO)


def run_training(
    cfg: Any,
    task: TrainTask,
    train_set: Any,
    val_set: Any = None,
    dist: Optional[DistInfo] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> TrainResult:
    """Train ``task.model`` on ``train_set`` as configured by ``cfg`` (a training schema).

    Args:
        cfg: ``IdGenTrainConfig`` / ``ExpGenTrainConfig`` / ``IdRankTrainConfig`` (uses the
            keys ``seed, resume, run_dir, data, optim, ema, train, val``).
        task: the model and its loss.
        train_set: map-style dataset taking :class:`StreamBatchSampler` keys.
        val_set: optional held-out dataset (integer keys) for ``task.validate``.
        dist: process placement (default: :func:`init_distributed` from the environment).
        on_step: called as ``on_step(step, loss)`` after every optimiser step (tests use it
            to stop a run abruptly).

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainingDiverged: a non-finite loss or gradient (nothing is saved for that step).
        CheckpointError: ``resume`` finds a checkpoint of another kind.
    """
    return _TrainingRun(cfg, task, train_set, val_set, dist, on_step).run()


class _TrainingRun:
    """One :func:`run_training` call: its state and its stages, in the order :meth:`run` runs them.

    The order matters for exact resume: the global torch RNG is restored from the checkpoint
    before anything that draws from it (the data loader's iterator draws its base seed).
    """

    def __init__(self, cfg: Any, task: TrainTask, train_set: Any, val_set: Any,
                 dist: Optional[DistInfo], on_step: Optional[Callable[[int, float], None]]) -> None:
        """Setup: process placement and device, run folder, log file, per-process batch size."""
        self.cfg, self.task, self.on_step = cfg, task, on_step
        self.train_set, self.val_set = train_set, val_set
        self.dist = dist or init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        _setup_logging(self.run_dir, self.dist.is_main)
        if cfg.data.actors_per_batch % self.dist.world_size:
            raise ConfigError(f"config key 'data.actors_per_batch' ({cfg.data.actors_per_batch}) must be "
                              f"divisible by the number of processes ({self.dist.world_size})")
        self.local_batch = cfg.data.actors_per_batch // self.dist.world_size
        self.step, self.best = 0, math.inf
        # what selects best.pt: the task's validation metric, else the mean training loss
        validates = val_set is not None and cfg.train.val_every
        self.best_name = task.metric_name if validates else "train/loss"
        self.window: list[float] = []  # global losses since the last checkpoint
        self.writer: Any = None
        self.bar: Any = None

    def _claim_run_dir(self) -> None:
        """Refuse to start afresh over an existing run unless told (``resume`` / ``overwrite``)."""
        cfg = self.cfg
        if self.dist.is_main and self.ckpt_dir.is_dir():
            remove_stale_temps(self.ckpt_dir)  # checkpoints of a run killed while writing them
        old = sorted(self.ckpt_dir.glob("*.pt")) if self.ckpt_dir.is_dir() else []
        if not old or cfg.resume:
            return
        if not cfg.overwrite:
            raise ConfigError(f"config key 'run_dir': {self.run_dir} already holds a run "
                              f"({', '.join(p.name for p in old)}); continue it with resume=true or "
                              "start afresh with overwrite=true")
        if self.dist.is_main:
            for p in old:
                p.unlink()
            log.info("overwrite=true: removed %s from %s", ", ".join(p.name for p in old), self.ckpt_dir)
        barrier()

    def run(self) -> TrainResult:
        """All stages: optimiser, resume, EMA, DDP, logging, data, the step loop, teardown."""
        self._claim_run_dir()
        self._build_optimizer()
        resumed = self._resume()
        self._place_ema(fresh=not resumed)
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self._wrap_model()
        self._open_writer()
        loader = self._make_loader()
        self.result = TrainResult(step=self.step, run_dir=self.run_dir, best_metric=self.best)
        self._open_progress_bar()
        self.last_saved = self.step if resumed else -1
        self.model.train()
        try:
            self._train(loader)
        finally:
            self._teardown()
        self.result.step = self.step
        return self.result

    # ---- setup --------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        """The model on its device, AdamW over the trainable parameters of each group, the EMA."""
        cfg = self.cfg
        self.model = self.task.model.to(self.device)
        groups = self.task.param_groups()
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
            g.setdefault("initial_lr", g["lr"])
        groups = [g for g in groups if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=groups[0]["lr"] if groups else 0.0,
                                     betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                     weight_decay=cfg.optim.weight_decay,
                                     foreach=True if groups else None)
        self.params = [p for g in groups for p in g["params"]]
        self.ema = EMA(self.model, cfg.ema.decay, self.task.ema_prefixes) if cfg.ema.enabled else None

    def _resume(self) -> bool:
        """With ``resume``, restore the loop state from ``latest.pt`` (read once); True if it did."""
        cfg, dist = self.cfg, self.dist
        ckpt_path = latest_checkpoint(self.run_dir) if cfg.resume else None
        if ckpt_path is None:
            if cfg.resume and dist.is_main:
                log.info("resume=true but no checkpoint in %s: starting from step 0", self.ckpt_dir)
            return False
        ck = read_checkpoint(ckpt_path, map_location="cpu")
        if ck.get("kind") != self.task.kind:
            raise CheckpointError(f"checkpoint {ckpt_path} is a {ck.get('kind')!r} checkpoint, "
                                  f"expected {self.task.kind!r}")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        self.step = int(ck["step"])
        self.best = float(ck.get("best_metric", math.inf))
        if ck.get("best_metric_name", self.best_name) != self.best_name:
            # e.g. IdGen validation gained or lost its ranker: the old best is not comparable
            if dist.is_main:
                log.info("best.pt was selected by %s, this run selects by %s: the best metric "
                         "starts afresh", ck["best_metric_name"], self.best_name)
            self.best = math.inf
        rng = ck.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if dist.is_main:
            log.info("resumed from %s at step %d", ckpt_path, self.step)
        return True

    def _place_ema(self, fresh: bool) -> None:
        """Move the EMA to the device; a fresh run starts it from the current weights."""
        if self.ema is None:
            return
        for name, s in self.ema.shadow.items():
            self.ema.shadow[name] = s.to(self.device)
        if fresh:
            self.ema.update(self.model, decay=0.0)

    def _wrap_model(self) -> None:
        """The module the step calls: the task's loss, under DDP when distributed; bf16 or not."""
        device, precision = self.device, self.cfg.train.precision
        self.loss_module: nn.Module = _LossModule(self.task)
        if self.dist.distributed:
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None)
        self.use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")

    def _open_writer(self) -> None:
        """TensorBoard writer on rank 0 when ``train.tensorboard``."""
        if not (self.dist.is_main and self.cfg.train.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed: no TensorBoard scalars")

    def _make_loader(self) -> torch.utils.data.DataLoader:
        """This rank's batch stream, starting at the current step."""

        cfg, dist = self.cfg, self.dist
        sampler = StreamBatchSampler(len(self.train_set), self.local_batch, seed=cfg.seed,
                                     rank=dist.rank, world_size=dist.world_size, start_step=self.step)
        nw = cfg.data.num_workers
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, num_workers=nw,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=2 if nw > 0 else None)

    def _open_progress_bar(self) -> None:
        """tqdm bar on rank 0 when ``train.progress``."""
        if self.dist.is_main and self.cfg.train.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.train.max_steps, initial=self.step, desc=self.task.kind,
                            dynamic_ncols=True)

    # ---- the loop -----------------------------------------------------------------------
    def _train(self, loader: torch.utils.data.DataLoader) -> None:
        """Steps until ``train.max_steps``; then ``latest.pt`` unless this step is already saved."""
        it = iter(loader)
        try:
            while self.step < self.cfg.train.max_steps:
                t0 = time.perf_counter()
                batch = _to_device(next(it), self.device)
                t1 = time.perf_counter()
                loss, stats, gnorm = self._optimizer_step(batch)
                t2 = time.perf_counter()
                self.result.data_seconds += t1 - t0
                self.result.compute_seconds += t2 - t1
                self._record(loss, stats, gnorm)
                self._periodic()
            if self.dist.is_main and self.last_saved != self.step:
                self._save("latest.pt")
        finally:
            del it  # loader workers end now, not when a caught exception is freed

    def _optimizer_step(self, batch: dict[str, torch.Tensor]):
        """One step: LR, loss, NaN guard, backward, clipping, NaN guard, AdamW, EMA.

        Returns ``(loss, stats, grad_norm)`` of the step; ``self.step`` is advanced.
        """
        cfg, device, step = self.cfg, self.device, self.step
        f = lr_factor(step, cfg.train.max_steps, cfg.optim.warmup_steps, cfg.optim.lr_schedule)
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * f
        gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, self.dist.rank))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            loss, stats = self.loss_module(batch, gen)
        loss = loss.float()
        if cfg.train.nan_guard and any_flag(not bool(torch.isfinite(loss)), device):
            raise TrainingDiverged(f"non-finite loss at step {step} ({loss.item()}); {self._last_good()}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip) if self.params else torch.zeros(())
        if cfg.train.nan_guard and any_flag(not bool(torch.isfinite(gnorm)), device):
            raise TrainingDiverged(f"non-finite gradient norm at step {step}; {self._last_good()}")
        self.opt.step()
        if cfg.train.nan_guard and any_flag(not _all_finite(self.params), device):
            raise TrainingDiverged(f"non-finite weights after the update of step {step} (learning rate "
                                   f"{max(g['lr'] for g in self.opt.param_groups):g}); {self._last_good()}")
        self.step = step = step + 1
        if self.ema is not None:
            self.ema.update(self.model, decay=0.0 if step <= cfg.ema.start_step else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss, stats, gnorm

    def _record(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], gnorm: torch.Tensor) -> None:
        """The step's global mean loss into the result, ``on_step``, progress bar and scalars."""
        gl = float(all_reduce_mean(loss.detach()).item())
        self.result.losses.append(gl)
        self.result.step = self.step
        self.window.append(gl)
        if self.on_step is not None:
            self.on_step(self.step, gl)
        if self.dist.is_main:
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{gl:.4f}")
            log_every = self.cfg.train.log_every
            if log_every and self.step % log_every == 0:
                _log_scalars(self.writer, self.step, gl, stats, self.task.num_steps, self.opt,
                             float(gnorm))

    def _periodic(self) -> None:
        """Validation, sample meshes and checkpoints due at this step (rank 0), then a barrier."""
        t, step, main = self.cfg.train, self.step, self.dist.is_main
        do_val = bool(t.val_every) and step % t.val_every == 0 and self.val_set is not None
        do_samples = bool(t.sample_every) and step % t.sample_every == 0
        do_ckpt = bool(t.ckpt_every) and step % t.ckpt_every == 0
        if (do_val or do_samples) and main:
            self._keep_if_best(self._evaluate_and_sample(do_val, do_samples))
        if do_ckpt and main:
            if self.val_set is None or not t.val_every:
                self._keep_if_best(sum(self.window) / max(len(self.window), 1))
            self.window = []
            self._save("latest.pt")
            self.last_saved = step
        if do_val or do_samples or do_ckpt:
            barrier()

    # ---- validation and checkpoints -----------------------------------------------------
    def _evaluate_and_sample(self, do_val: bool, do_samples: bool) -> Optional[float]:
        """Validate and/or write sample meshes with the EMA weights; the selecting metric or None."""
        task, model, step = self.task, self.model, self.step
        metric = None
        model.eval()
        ctx = self.ema.swapped_in(model) if self.ema is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            if do_val and self.val_set is not None:
                g = torch.Generator(device=self.device).manual_seed(self.cfg.val.seed)
                metrics = task.validate(model, self.val_set, g)
                self.result.metrics = dict(metrics)
                for k, v in metrics.items():
                    if self.writer is not None:
                        self.writer.add_scalar(k, v, step)
                log.info("step %d validation: %s", step,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                metric = metrics.get(task.metric_name)
            if do_samples:
                g = torch.Generator(device=self.device).manual_seed(self.cfg.val.seed + 1)
                task.write_samples(model, self.val_set if self.val_set is not None else self.train_set,
                                   self.run_dir / "samples" / f"{step:07d}", g)
        model.train()
        return metric

    def _keep_if_best(self, metric: Optional[float]) -> None:
        """Write ``best.pt`` when ``metric`` improves on the best so far."""
        if metric is not None and metric < self.best:
            self.best = metric
            self.result.best_metric = metric
            self._save("best.pt")

    def _last_good(self) -> str:
        """The end of a divergence message: which checkpoint still holds finite weights."""
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return "stopped before any checkpoint was written"
        return f"stopped, the last good checkpoint is {latest}"

    def _save(self, path_name: str) -> None:
        """Checkpoint ``ckpt_dir/path_name`` (atomic) with everything exact resume needs."""
        ema, model, best = self.ema, self.model, self.best
        payload = {
            "model": model.state_dict(),
            "ema": ema.full_state_dict(model) if ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "config": config_to_dict(self.cfg),
            "kind": self.task.kind,
            "rng": {"torch": torch.get_rng_state()},
            "best_metric": best if math.isfinite(best) else float("inf"),
            "best_metric_name": self.best_name,
        }
        save_checkpoint(self.ckpt_dir / path_name, payload)

    def _teardown(self) -> None:
        """Close the progress bar and flush and close the TensorBoard writer."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _log_scalars(writer, step: int, loss: float, stats: dict, num_steps: int,
                 opt: torch.optim.Optimizer, gnorm: float) -> None:
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}
    log.info("step %d loss %.5f grad_norm %.4g lr %s", step, loss, gnorm,
             " ".join(f"{k}={v:.3g}" for k, v in lrs.items()))
    if writer is None:
        return
    writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("train/grad_norm", gnorm, step)
    for k, v in lrs.items():
        writer.add_scalar(f"lr/{k}", v, step)
    per, t = stats.get("loss"), stats.get("t")
    if per is not None and t is not None and num_steps:
        q = (t.detach().float() * 4 / num_steps).long().clamp(0, 3)
        per = per.detach().float()
        for i in range(4):
            sel = q == i
            if bool(sel.any()):
                writer.add_scalar(f"train/loss_q{i}", float(per[sel].mean()), step)
