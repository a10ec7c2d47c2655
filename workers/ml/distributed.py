"""Training on several devices of one host: DistributedDataParallel over N processes.

`fit_on_devices` is `fit` (workers/ml/training.py) run by N rank processes that the calling
process (a worker's job, in the Celery solo pool) spawns and watches:

- ranks use NCCL and cuda:<first + rank> when the device is CUDA, gloo (over loopback) and the
  CPU otherwise; they meet through a FileStore in a private scratch directory (no port to
  choose, so no race for one); the process group has a timeout, so a rank stuck in a
  collective ends;
- every global batch of `cfg.batch_size` (the same batches, in the same order, that one
  process draws) is split across the ranks, as DistributedSampler would split the data: rank
  r takes every N-th example, and a batch whose size is not a multiple of N is padded by
  repeating its first examples. DDP averages the ranks' gradients, so a step is the step one
  process takes on the global batch;
- rank 0 alone validates (and shares the result), writes the checkpoints and evaluates at the
  end; every rank resumes from the same checkpoint, each with its own RNG state;
- only rank 0 reports: its epochs, progress and resume reach the caller's callbacks, called
  in the calling process (which holds the job's lease and database connection);
- the calling process polls `should_stop` (a cancel, a lost lease) and stops the ranks; a rank
  that fails or dies ends the others and raises here (RankFailed, or the rank's ValueError),
  never hangs: the job's next attempt resumes from the last checkpoint. A rank's traceback is
  logged, and the error names the rank, its exception and the innermost frame.

No model, data or result is pickled (the standing rule: safetensors and JSON only). Each rank
builds its model and data itself with `RankInputs` (an importable builder and JSON arguments:
for a job, its spec and dataset read through the artifact layer, workers/kinds/train_ranks.py)
and checks that they are the caller's (split sizes, a digest of the data's tensors, parameter
names and shapes). The caller's initial weights reach the ranks, and rank 0's final weights
come back, as safetensors files in the scratch directory; the ranks' reports are JSON lines
there, and a stop is a file there. A spawned rank's arguments (which multiprocessing pickles)
are a few ints and strings: the plan is one JSON string.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .data import Batch, BatchDataset, EpochBatchSampler, PreparedData, _collate_batch
from .training import TrainConfig, TrainingCancelled, fit, resolve_device

log = logging.getLogger(__name__)

MAX_DEVICES = 8
PROCESS_GROUP_TIMEOUT_S = 1800.0  # a collective waits this long for a live rank (rank 0 validating)
STOP_GRACE_S = 10.0  # after a stop, how long ranks get to end on their own before they are killed

_live_ranks: set[int] = set()  # pids of running ranks, for the CPU metering of the job
_metered: list[bool] = []


def _count_rank_cpu() -> None:
    """Count the running ranks' CPU time as this process's (once; not imported by the ranks)."""
    if not _metered:
        from workers import metering

        metering.count_child_processes(lambda: list(_live_ranks))
        _metered.append(True)


class RankFailed(RuntimeError):
    """A rank raised or died: the attempt fails (and the job retries from its checkpoint)."""


_BUILDER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclasses.dataclass(frozen=True)
class RankInputs:
    """How a rank builds its model and data: `builder` ("package.module:function") called
    with **args (JSON values only) returns (model, data) equal to the caller's (the same
    architecture and the same splits; the weights are the caller's, loaded after)."""

    builder: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _BUILDER.match(self.builder):
            raise ValueError(f"builder must be 'package.module:function', got {self.builder!r}")
        json.dumps(self.args)  # TypeError now, in the caller, for anything that is not JSON

    def build(self) -> tuple[nn.Module, PreparedData]:
        module, name = self.builder.split(":")
        model, data = getattr(importlib.import_module(module), name)(**self.args)
        return model, data


# --------------------------------------------------------------------------- devices


def rank_devices(device: str, devices: int) -> list[torch.device]:
    """The device of each rank for the spec's `device` (auto, cpu, cuda, cuda:K): cuda:K..K+N-1
    when CUDA is asked or available (auto), else N times the CPU. ValueError naming `devices`
    when this host has fewer GPUs, or fewer CPUs, than asked."""
    if not 1 <= devices <= MAX_DEVICES:
        raise ValueError(f"devices must be from 1 to {MAX_DEVICES}, got {devices}")
    base = resolve_device(device)
    if base.type == "cuda":
        first, count = base.index or 0, torch.cuda.device_count()
        if first + devices > count:
            raise ValueError(
                f"devices {devices} from cuda:{first} asked, but this worker sees {count} GPU(s); "
                "ask fewer devices or run the job on a worker with more GPUs"
            )
        return [torch.device("cuda", first + r) for r in range(devices)]
    cpus = os.cpu_count() or 1
    if devices > cpus:
        raise ValueError(f"devices {devices} asked on the CPU, but this worker has {cpus} CPU(s); ask at most {cpus}")
    return [torch.device("cpu")] * devices


# --------------------------------------------------------------------------- one rank


class ShardedBatchSampler(EpochBatchSampler):
    """Rank `rank`'s share of each batch of EpochBatchSampler(n, batch_size): the same global
    batches in the same order as one process, each split as DistributedSampler splits a
    dataset (every `world`-th example, padded by repetition to a multiple of `world`), so every
    rank takes the same number of examples at every step."""

    def __init__(self, n: int, batch_size: int, *, rank: int, world: int, **kwargs: Any) -> None:
        super().__init__(n, batch_size, **kwargs)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            size = -(-len(batch) // self.world) * self.world
            padded = [batch[i % len(batch)] for i in range(size)]
            yield padded[self.rank :: self.world]


@dataclasses.dataclass
class Rank:
    """What `fit` needs to know of its rank (passed as fit(..., distributed=rank))."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def train_loader(self, dataset: BatchDataset, cfg: TrainConfig) -> DataLoader[Batch]:
        lengths = getattr(dataset, "lengths", None)
        sampler = ShardedBatchSampler(
            len(dataset),
            cfg.batch_size,
            rank=self.rank,
            world=self.world,
            shuffle=True,
            seed=cfg.seed,
            lengths=None if lengths is None else lengths.numpy(),
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=_collate_batch,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model for training: DDP over the process group (after the weights are final for
        the start: DDP broadcasts rank 0's)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
        keep_cpu = getattr(model, "cpu_inputs", None)
        if keep_cpu is not None:  # move_inputs asks the model it calls (RNN lengths stay on the CPU)
            wrapped.cpu_inputs = keep_cpu
        return wrapped

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (each rank took as many examples)."""
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` (JSON: metrics), on every rank."""
        device = self._collective_device()
        payload = json.dumps(obj, default=_json_default).encode() if self.is_main else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
        return json.loads(buf.cpu().numpy().tobytes())

    def rng_states(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state (rank order), for the checkpoint."""
        device = self._collective_device()
        mine = torch.get_rng_state().to(device)
        states = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(states, mine)
        return [s.cpu() for s in states]

    def restore_rng(self, checkpoint: dict[str, Any]) -> None:
        """This rank's RNG state from a checkpoint a run of as many ranks wrote (resume_checkpoint
        already restored rank 0's, which a run with another number of ranks keeps)."""
        states = (checkpoint.get("rng") or {}).get("ranks")
        if isinstance(states, list) and len(states) == self.world:
            torch.set_rng_state(states[self.rank])

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the process that spawned it dies (a killed worker must
    not leave ranks writing its job's checkpoint)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------- the scratch directory
# initial.safetensors / final.safetensors   the caller's weights in, rank 0's weights out
# rank-R.jsonl     rank R's reports to the caller, one JSON object a line
# stop             present: the ranks stop (a cancel, a lost lease, a failed rank)
# store            the process group's FileStore


def _json_default(value: Any) -> Any:
    """Metrics may hold numpy or torch scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as separate CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _save_weights(path: Path, model: nn.Module) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(_state_tensors(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)  # whole or absent


def fingerprint(model: nn.Module, data: PreparedData) -> dict[str, Any]:
    """What a rank's own model and data must match of the caller's: parameter names and
    shapes, each split's size and a digest of its tensors."""
    splits = {}
    for name, ds in data.splits().items():
        digest = hashlib.blake2b(digest_size=16)
        for attr, value in sorted(vars(ds).items()):
            if isinstance(value, torch.Tensor):
                digest.update(attr.encode())
                digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        splits[name] = {"rows": len(ds), "digest": digest.hexdigest()}
    return {
        "state": {k: list(v.shape) for k, v in model.state_dict().items()},
        "splits": splits,
        "head": data.head.name,
    }


class _Reporter:
    """A rank's reports to the caller: JSON lines appended to its file (one writer a file)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def __call__(self, *message: Any) -> None:
        line = json.dumps(list(message), default=_json_default) + "\n"
        os.write(self.fd, line.encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Inbox:
    """The caller's side: the complete lines each rank appended since the last read."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.offsets = [0] * len(paths)

    def read(self) -> Iterator[list[Any]]:
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets[i])
                    chunk = fh.read()
            except FileNotFoundError:
                continue
            end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
            self.offsets[i] += end
            for line in chunk[:end].splitlines():
                yield json.loads(line)


def _rank_main(rank: int, world: int, device_name: str, scratch: str, parent: int, plan_json: str) -> None:
    """The body of rank `rank`: build the model and data, fit on its share, report (rank 0).
    `plan_json`: the inputs, the config, the checkpoint and the caller's fingerprint (an
    argument, not a file: the inputs may carry the worker's settings, secrets included)."""
    _die_with_parent()
    here = Path(scratch)
    report = _Reporter(here / f"rank-{rank}.jsonl")
    try:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks share this host
        plan = json.loads(plan_json)
        inputs = RankInputs(plan["inputs"]["builder"], plan["inputs"]["args"])
        model, data = inputs.build()
        mine = fingerprint(model, data)
        if mine != plan["fingerprint"]:
            differ = sorted(k for k in mine if mine[k] != plan["fingerprint"][k])
            raise RuntimeError(f"{inputs.builder} built other {' and '.join(differ)} than the worker's")
        model.load_state_dict(load_file(str(here / "initial.safetensors")), strict=True)
        cfg = dataclasses.replace(TrainConfig(**plan["config"]), device=str(device))
        stop_file = here / "stop"

        def should_stop() -> bool:
            return stop_file.exists() or os.getppid() != parent

        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"file://{here / 'store'}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=plan["timeout_s"]),
        )
        main = rank == 0
        outcome = fit(
            model,
            data,
            cfg,
            checkpoint_path=plan["checkpoint_path"],
            on_epoch=(lambda epoch, metrics: report("epoch", epoch, metrics)) if main else None,
            on_progress=(lambda f, message, eta: report("progress", f, message, eta)) if main else None,
            on_resume=(lambda history: report("resume", history)) if main else None,
            should_stop=should_stop,
            distributed=Rank(rank, world, device),
        )
        if main:
            _save_weights(here / "final.safetensors", model)
            report("done", outcome)
    except TrainingCancelled:
        report("cancelled", rank)
    except BaseException as exc:  # reported to the caller, which fails the attempt
        report("error", rank, type(exc).__name__, str(exc), traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        report.close()
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


# --------------------------------------------------------------------------- the caller

# A rank's error of these types is raised again as such (the job's error then reads as one
# process's would); any other failure is a RankFailed naming the rank.
_SAME_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "FloatingPointError": FloatingPointError,
    "OutOfMemoryError": torch.cuda.OutOfMemoryError,
}


def _where(trace: str) -> str:
    """The innermost 'File ..., line N, in f' of a traceback, shortened to the repository."""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith('File "')]
    if not frames:
        return ""
    return re.sub(r'File ".*?/((?:workers|app|tests|torch)/[^"]*)"', r'File "\1"', frames[-1])


def _end(procs: list[Any], grace_s: float) -> None:
    """Wait up to grace_s for the ranks to exit, then terminate (and kill) what is left."""
    procs = [p for p in procs if p.pid is not None]  # started
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)
        _live_ranks.discard(p.pid or -1)


def fit_on_devices(
    model: nn.Module,
    data: PreparedData,
    cfg: TrainConfig,
    devices: int,
    *,
    inputs: RankInputs,
    checkpoint_path: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    on_progress: Callable[[float, str, float | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_resume: Callable[[list[dict[str, Any]]], None] | None = None,
    timeout_s: float = PROCESS_GROUP_TIMEOUT_S,
    grace_s: float = STOP_GRACE_S,
    poll_s: float = 0.2,
) -> dict[str, Any]:
    """`fit` on `devices` rank processes (see the module's docstring); the same result as fit,
    with rank 0's final weights loaded into `model`, and "devices" added. `inputs` builds, in
    each rank, the model and data that `model` and `data` are (RuntimeError naming what
    differs, before any training). Raises TrainingCancelled when should_stop() turned True
    (the ranks are stopped), RankFailed (or the rank's ValueError) when a rank failed or died
    (the others are stopped)."""
    targets = rank_devices(cfg.device, devices)
    _count_rank_cpu()
    plan = {
        "inputs": dataclasses.asdict(inputs),
        "config": dataclasses.asdict(cfg),
        "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
        "timeout_s": timeout_s,
        "fingerprint": fingerprint(model, data),
    }
    plan_json = json.dumps(plan, default=_json_default)
    scratch = Path(tempfile.mkdtemp(prefix="medmaas-ddp-"))
    mp = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
    procs = [
        mp.Process(
            target=_rank_main,
            args=(r, devices, str(targets[r]), str(scratch), os.getpid(), plan_json),
            name=f"medmaas-rank-{r}",
        )
        for r in range(devices)
    ]
    done: list[dict[str, Any]] = []
    errors: list[tuple[str, str, str]] = []  # (type, message, what the job's error says) of ranks that raised
    cancelled: list[int] = []

    def handle(message: list[Any]) -> None:
        tag = message[0]
        if tag == "epoch" and on_epoch is not None:
            on_epoch(message[1], message[2])
        elif tag == "progress" and on_progress is not None:
            on_progress(message[1], message[2], message[3])
        elif tag == "resume" and on_resume is not None:
            on_resume(message[1])
        elif tag == "done":
            done.append(message[1])
        elif tag == "cancelled":
            cancelled.append(message[1])
        elif tag == "error":
            rank, kind, text, trace = message[1:5]
            log.error("rank %s of %s failed: %s: %s\n%s", rank, devices, kind, text, trace)
            where = _where(trace)
            errors.append(
                (kind, text, f"rank {rank} of {devices} failed: {kind}: {text}{f' ({where})' if where else ''}")
            )

    inbox = _Inbox([scratch / f"rank-{r}.jsonl" for r in range(devices)])
    killed: list[str] = []
    try:
        _save_weights(scratch / "initial.safetensors", model)
        try:
            for p in procs:
                p.start()
                _live_ranks.add(p.pid or -1)
            last_check = 0.0
            while True:
                exited = [p.exitcode for p in procs]  # before reading: what a rank wrote before it exited is read
                for message in inbox.read():
                    handle(message)
                now = time.monotonic()
                if should_stop is not None and now - last_check >= poll_s:
                    last_check = now
                    if should_stop():
                        raise TrainingCancelled("training cancelled")
                if errors or cancelled:
                    break
                if any(code not in (None, 0) for code in exited) or all(code == 0 for code in exited):
                    break
                time.sleep(poll_s)
            time.sleep(0.2 if errors else 0.0)  # a rank killed under the one that reported is the cause
            for r, p in enumerate(procs):
                code = p.exitcode
                if code is not None and code < 0:
                    killed.append(f"rank {r} of {devices} was killed by signal {-code}")
                elif code not in (None, 0) and not errors:
                    killed.append(
                        f"rank {r} of {devices} exited with code {code} before it reported (see the worker log)"
                    )
        finally:
            (scratch / "stop").touch()
            _end(procs, grace_s if not done else min(grace_s, 5.0))
        failure = "; ".join(killed + [text for _, _, text in errors])
        if failure:
            same = _SAME_ERRORS.get(errors[0][0]) if errors and not killed else None
            if same is not None:  # what one process would have raised (bad data, divergence, GPU memory)
                raise same(errors[0][1])
            raise RankFailed(failure)
        if cancelled:
            raise TrainingCancelled("training cancelled")
        if not done:
            raise RankFailed(f"the {devices} ranks ended without rank 0's result")
        model.load_state_dict(load_file(str(scratch / "final.safetensors")), strict=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**done[0], "devices": devices, "device": ",".join(dict.fromkeys(str(d) for d in targets))}


__all__ = [
    "MAX_DEVICES",
    "Rank",
    "RankFailed",
    "RankInputs",
    "ShardedBatchSampler",
    "fingerprint",
    "fit_on_devices",
    "rank_devices",
]
