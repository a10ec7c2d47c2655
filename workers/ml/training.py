"""Training loop: `train_one_epoch`, `evaluate`, and `fit` with resumable checkpoints.

Checkpoints hold only tensors and plain Python types, so they load with
`torch.load(path, weights_only=True)`; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader

from app import artifacts
from app.artifacts import open_read, open_write

from .data import Batch, EpochBatchSampler, PreparedData, make_loader
from .heads import Head, MetricMode

if TYPE_CHECKING:
    from .distributed import Rank

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step", "plateau")
CHECKPOINT_VERSION = 1


class TrainingCancelled(Exception):
    """Raised between batches when `should_stop()` returns True."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"
    step_size: int = 10  # step scheduler: epochs between decays
    gamma: float = 0.1  # step decay / plateau factor
    plateau_patience: int = 2
    early_stopping_patience: int | None = None  # epochs without improvement; None = off
    monitor: str = "loss"  # validation metric for best weights / early stopping
    grad_clip: float | None = None  # max gradient norm
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    max_len: int = 256  # sequence truncation, used when the data is prepared
    num_workers: int = 0
    eval_batch_size: int | None = None  # default: 4 x batch_size
    progress_interval: float = 2.0  # seconds between on_progress calls within an epoch

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True) -> TrainConfig:
        """From a job spec; strict=False ignores keys that are not training parameters."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown and strict:
            raise ValueError(f"unknown training parameters: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA GPUs that support it; full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def move_inputs(model: nn.Module, inputs: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Copy a batch's inputs to `device`, except those the model wants on CPU (RNN lengths)."""
    keep_cpu = getattr(model, "cpu_inputs", ())
    return tuple(x if i in keep_cpu else x.to(device, non_blocking=True) for i, x in enumerate(inputs))


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise TrainingCancelled("training cancelled")


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Batch],
    optimizer: torch.optim.Optimizer,
    head: Head,
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
    grad_clip: float | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """One pass over `loader`; returns the mean training loss."""
    model.train()
    total = torch.zeros((), device=device)  # accumulated on device: no sync per batch
    count = 0
    n_batches = len(loader)
    for i, (inputs, targets) in enumerate(loader):
        _check_stop(should_stop)
        inputs = move_inputs(model, inputs, device)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, autocast_dtype):
            outputs = model(*inputs)
        loss = head.loss(outputs.float(), targets)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total += loss.detach() * len(targets)
        count += len(targets)
        if on_batch is not None:
            on_batch(i + 1, n_batches)
    return float(total) / max(count, 1)


@torch.inference_mode()
def predict_outputs(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw outputs and targets over a loader, on CPU, float32 outputs."""
    model.eval()
    outs: list[torch.Tensor] = []
    tgts: list[torch.Tensor] = []
    for inputs, targets in loader:
        _check_stop(should_stop)
        with _autocast(device, autocast_dtype):
            outs.append(model(*move_inputs(model, inputs, device)).float())
        tgts.append(targets)
    if not outs:
        return torch.empty(0), torch.empty(0)
    return torch.cat(outs).cpu(), torch.cat(tgts)


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    head: Head,
    device: torch.device,
    *,
    autocast_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float | None]:
    """{"loss": ..., **head metrics} over `loader` (empty dict for an empty loader)."""
    outputs, targets = predict_outputs(model, loader, device, autocast_dtype=autocast_dtype, should_stop=should_stop)
    if outputs.numel() == 0:
        return {}
    return {"loss": float(head.loss(outputs, targets)), **head.metrics(outputs.numpy(), targets.numpy())}


def combine_members(outputs: torch.Tensor, head: Head) -> torch.Tensor:
    """Raw outputs [M, N, K] of ensemble members -> the raw outputs [N, K] of their mean
    prediction: mean values (regression), log of the mean class probabilities
    (classification), logit of the mean label probabilities (multilabel)."""
    if head.name == "classification":
        return torch.log(torch.softmax(outputs.float(), dim=-1).mean(0).clamp_min(1e-12))
    if head.name == "multilabel":
        return torch.logit(torch.sigmoid(outputs.float()).mean(0), eps=1e-6)
    return outputs.float().mean(0)


def evaluate_members(
    members: Sequence[nn.Module],
    loader: Iterable[Batch],
    head: Head,
    device: torch.device,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float | None]:
    """`evaluate` of the members' mean prediction (combine_members)."""
    per_member = [predict_outputs(m.to(device), loader, device, should_stop=should_stop) for m in members]
    if not per_member or per_member[0][0].numel() == 0:
        return {}
    outputs = combine_members(torch.stack([o for o, _ in per_member]), head)
    targets = per_member[0][1]
    return {"loss": float(head.loss(outputs, targets)), **head.metrics(outputs.numpy(), targets.numpy())}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Atomic save: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_write(path) as fh:
        torch.save(checkpoint, fh)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open_read(path) as fh:
        return torch.load(fh, map_location="cpu", weights_only=True)


def epoch_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    best_model: dict[str, torch.Tensor] | None,
    state: Mapping[str, Any],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """What a training loop saves after each epoch: weights, optimizer (and scheduler), the best
    weights so far, the loop's own `state` (epoch, best score, history...), the config and the
    RNG states, so that a resumed run draws what an uninterrupted one would."""
    return {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "best_model": best_model,
        **state,
        "config": dataclasses.asdict(cfg),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        },
    }


def resume_checkpoint(
    path: str | os.PathLike[str] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    device: torch.device,
) -> dict[str, Any] | None:
    """Load an `epoch_checkpoint` at `path` into the model, optimizer (and scheduler) and the
    RNGs, and return it (for the loop's state and best weights); None when there is none."""
    if path is None or not artifacts.exists(path):
        return None
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, mode: MetricMode) -> LRScheduler | None:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.gamma, patience=cfg.plateau_patience
        )
    return None


def _improved(score: float | None, best: float | None, mode: MetricMode) -> bool:
    if score is None or not math.isfinite(score):
        return False
    return best is None or (score < best if mode == "min" else score > best)


# --------------------------------------------------------------------------- fit


class _FitState(TypedDict):
    """Progress of `fit` that a checkpoint carries across restarts."""

    epoch: int
    best_score: float | None
    best_epoch: int
    bad_epochs: int
    stopped_early: bool
    history: list[dict[str, Any]]


def fit(
    model: nn.Module,
    data: PreparedData,
    cfg: TrainConfig,
    head: Head | None = None,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    on_progress: Callable[[float, str, float | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_resume: Callable[[list[dict[str, Any]]], None] | None = None,
    distributed: Rank | None = None,
) -> dict[str, Any]:
    """Train `model` for cfg.epochs epochs in total, resuming from `checkpoint_path`.
    on_resume(history) is called once after a resume with the checkpoint's per-epoch metrics
    (an epoch is checkpointed before on_epoch reports it: a run that died in between never
    reported its last one).

    Keeps the weights with the best validation `cfg.monitor` (train loss when there is
    no validation set) and leaves them loaded in `model`. Returns
    {"test", "val", "history", "best_epoch", "epochs_trained", "stopped_early", "device"}.
    Raises TrainingCancelled when should_stop() turns True; the last completed epoch's
    checkpoint remains and a later call continues from it.

    `distributed`: this process is one rank of a DistributedDataParallel run
    (workers/ml/distributed.py): it trains on its share of every global batch, rank 0 alone
    validates (and shares the result), writes checkpoints and evaluates at the end (the other
    ranks return empty val/test).
    """
    head = head or data.head
    device = resolve_device(cfg.device)
    amp = autocast_dtype_for(device)
    seed_everything(cfg.seed if distributed is None else cfg.seed + distributed.rank)  # rank 0 draws as one process
    main = distributed is None or distributed.is_main
    model.to(device)

    has_val = data.val is not None and len(data.val) > 0
    monitor = cfg.monitor if has_val else "loss"
    if monitor not in head.metric_modes:
        raise ValueError(
            f"monitor {cfg.monitor!r} is not a {head.name} metric; choose from {sorted(head.metric_modes)}"
        )
    mode = head.metric_modes[monitor]
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, mode)
    eval_bs = cfg.eval_batch_size or cfg.batch_size * 4
    loaders = {
        k: make_loader(
            ds,
            cfg.batch_size if k == "train" else eval_bs,
            shuffle=k == "train",
            seed=cfg.seed,
            device=device,
            num_workers=cfg.num_workers,
        )
        for k, ds in data.splits().items()
    }
    if distributed is not None:
        loaders["train"] = distributed.train_loader(data.train, cfg)

    state = _FitState(epoch=0, best_score=None, best_epoch=0, bad_epochs=0, stopped_early=False, history=[])
    best_state: dict[str, torch.Tensor] | None = None
    ckpt = resume_checkpoint(checkpoint_path, model, optimizer, scheduler, device)
    if ckpt is not None:
        state = _FitState(
            epoch=ckpt["epoch"],
            best_score=ckpt["best_score"],
            best_epoch=ckpt["best_epoch"],
            bad_epochs=ckpt["bad_epochs"],
            stopped_early=ckpt["stopped_early"],
            history=ckpt["history"],
        )
        best_state = ckpt.get("best_model")
        if distributed is not None:
            distributed.restore_rng(ckpt)
        if on_resume is not None:
            on_resume(list(state["history"]))
    train_model = model if distributed is None else distributed.wrap(model)

    start_epoch, t_start = state["epoch"], time.monotonic()
    total_epochs = cfg.epochs
    last_report = [0.0]

    def report(fraction: float, message: str) -> None:
        if on_progress is None:
            return
        done = fraction - start_epoch / total_epochs
        elapsed = time.monotonic() - t_start
        eta = elapsed * (1.0 - fraction) / done if done > 0 else None
        on_progress(min(fraction, 1.0), message, eta)

    for epoch in range(start_epoch + 1, total_epochs + 1):
        if state["stopped_early"]:
            break
        t0 = time.monotonic()
        train_sampler = loaders["train"].batch_sampler
        if isinstance(train_sampler, EpochBatchSampler):  # always, as built by make_loader
            train_sampler.set_epoch(epoch)
        set_data_epoch = getattr(data.train, "set_epoch", None)
        if set_data_epoch is not None:  # augmented data draws this epoch's random SMILES
            set_data_epoch(epoch)

        def on_batch(i: int, n: int, epoch: int = epoch) -> None:
            now = time.monotonic()
            if now - last_report[0] >= cfg.progress_interval:
                last_report[0] = now
                report((epoch - 1 + i / n) / total_epochs, f"epoch {epoch}/{total_epochs}, batch {i}/{n}")

        train_loss = train_one_epoch(
            train_model,
            loaders["train"],
            optimizer,
            head,
            device,
            autocast_dtype=amp,
            should_stop=should_stop,
            grad_clip=cfg.grad_clip,
            on_batch=on_batch,
        )
        if distributed is not None:
            train_loss = distributed.mean(train_loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss}); lower lr")
        val = (
            evaluate(model, loaders["val"], head, device, autocast_dtype=amp, should_stop=should_stop)
            if has_val and main
            else {}
        )
        if distributed is not None:
            val = distributed.share(val)
        score = val.get(monitor) if has_val else train_loss
        if _improved(score, state["best_score"], mode):
            state["best_score"], state["best_epoch"], state["bad_epochs"] = score, epoch, 0
            best_state = _cpu_state(model)
        else:
            state["bad_epochs"] += 1
        if isinstance(scheduler, ReduceLROnPlateau):
            if score is not None and math.isfinite(score):
                scheduler.step(score)
        elif scheduler is not None:
            scheduler.step()
        patience = cfg.early_stopping_patience
        state["stopped_early"] = bool(patience and state["bad_epochs"] >= patience and epoch < total_epochs)

        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val.get("loss"),
            **{f"val_{k}": v for k, v in val.items() if k != "loss"},
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.monotonic() - t0,
            "best_epoch": state["best_epoch"],
        }
        state["epoch"] = epoch
        state["history"].append(metrics)
        if checkpoint_path is not None:
            checkpoint = epoch_checkpoint(model, optimizer, scheduler, best_state, state, cfg, device)
            if distributed is not None:
                checkpoint["rng"]["ranks"] = distributed.rng_states()
            if main:
                save_checkpoint(checkpoint_path, checkpoint)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        last_report[0] = time.monotonic()
        report(epoch / total_epochs, f"epoch {epoch}/{total_epochs} done")

    if best_state is not None:
        model.load_state_dict(best_state)
    val = (
        evaluate(model, loaders["val"], head, device, autocast_dtype=amp, should_stop=should_stop)
        if has_val and main
        else {}
    )
    test = (
        evaluate(model, loaders["test"], head, device, autocast_dtype=amp, should_stop=should_stop)
        if "test" in loaders and main
        else {}
    )
    return {
        "test": test,
        "val": val,
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "epochs_trained": state["epoch"],
        "stopped_early": state["stopped_early"],
        "device": str(device),
    }
