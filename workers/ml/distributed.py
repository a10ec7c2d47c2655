"""Training on several devices of one host: DistributedDataParallel over N processes.

`fit_on_devices` is `fit` (workers/ml/training.py) run by N rank processes that the calling
process (a worker's job, in the Celery solo pool) spawns and watches:

- ranks use NCCL and cuda:<first + rank> when the device is CUDA, gloo and the CPU otherwise;
  the process group has a timeout, so a rank stuck in a collective ends;
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
  never hangs: the job's next attempt resumes from the last checkpoint.

The model, data and config reach the ranks pickled by this process (a copy per rank, never
shared memory), and rank 0's final weights come back as `torch.save` bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import multiprocessing
import os
import pickle
import queue
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .data import Batch, BatchDataset, EpochBatchSampler, PreparedData, _collate_batch
from .training import TrainConfig, TrainingCancelled, fit, resolve_device

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
        """Rank 0's `obj`, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def rng_states(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state (rank order), for the checkpoint."""
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, torch.get_rng_state())
        return states

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


def _rank_main(
    rank: int,
    world: int,
    device_name: str,
    store_file: str,
    timeout_s: float,
    payload: bytes,
    channel: Any,
    stop: Any,
    parent: int,
) -> None:
    """The body of rank `rank`: fit on its share, report through `channel` (rank 0 only)."""
    _die_with_parent()
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{store_file}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        model, data, cfg, checkpoint_path = pickle.loads(payload)  # our parent's own bytes
        cfg = dataclasses.replace(cfg, device=str(device))
        me = Rank(rank, world, device)

        def should_stop() -> bool:
            return bool(stop.is_set()) or os.getppid() != parent

        main = rank == 0
        outcome = fit(
            model,
            data,
            cfg,
            checkpoint_path=checkpoint_path,
            on_epoch=(lambda epoch, metrics: channel.put(("epoch", epoch, metrics))) if main else None,
            on_progress=(lambda f, message, eta: channel.put(("progress", f, message, eta))) if main else None,
            on_resume=(lambda history: channel.put(("resume", history))) if main else None,
            should_stop=should_stop,
            distributed=me,
        )
        if main:
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
            channel.put(("done", outcome, buf.getvalue()))
    except TrainingCancelled:
        channel.put(("cancelled", rank))
    except BaseException as exc:  # reported to the parent, which fails the attempt
        channel.put(("error", rank, type(exc).__name__, str(exc), traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


# --------------------------------------------------------------------------- the parent

# A rank's error of these types is raised again as such (the job's error then reads as one
# process's would); any other failure is a RankFailed naming the rank.
_SAME_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "FloatingPointError": FloatingPointError,
    "OutOfMemoryError": torch.cuda.OutOfMemoryError,
}


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
    with rank 0's final weights loaded into `model`, and "devices" added. Raises
    TrainingCancelled when should_stop() turned True (the ranks are stopped), RankFailed (or
    the rank's ValueError) when a rank failed or died (the others are stopped)."""
    targets = rank_devices(cfg.device, devices)
    _count_rank_cpu()
    payload = pickle.dumps((model.cpu(), data, cfg, None if checkpoint_path is None else str(checkpoint_path)))
    mp = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
    channel = mp.Queue()
    stop = mp.Event()
    rendezvous = Path(tempfile.mkdtemp(prefix="medmaas-ddp-"))
    procs = [
        mp.Process(
            target=_rank_main,
            args=(
                r,
                devices,
                str(targets[r]),
                str(rendezvous / "store"),
                timeout_s,
                payload,
                channel,
                stop,
                os.getpid(),
            ),
            name=f"medmaas-rank-{r}",
        )
        for r in range(devices)
    ]
    done: list[tuple[dict[str, Any], bytes]] = []
    errors: list[tuple[str, str, str]] = []  # (type, message, what the job's error says) of ranks that raised
    cancelled: list[int] = []

    def handle(message: tuple[Any, ...]) -> None:
        tag = message[0]
        if tag == "epoch" and on_epoch is not None:
            on_epoch(message[1], message[2])
        elif tag == "progress" and on_progress is not None:
            on_progress(message[1], message[2], message[3])
        elif tag == "resume" and on_resume is not None:
            on_resume(message[1])
        elif tag == "done":
            done.append((message[1], message[2]))
        elif tag == "cancelled":
            cancelled.append(message[1])
        elif tag == "error":
            errors.append(
                (message[2], message[3], f"rank {message[1]} of {devices} failed: {message[2]}: {message[3]}")
            )

    def drain() -> None:
        with contextlib.suppress(queue.Empty, OSError, EOFError):
            while True:
                handle(channel.get(timeout=0.1))

    killed: list[str] = []
    try:
        for p in procs:
            p.start()
            _live_ranks.add(p.pid or -1)
        last_check = 0.0
        while True:
            try:
                handle(channel.get(timeout=poll_s))
                empty = False
            except queue.Empty:
                empty = True
            now = time.monotonic()
            if should_stop is not None and now - last_check >= poll_s:
                last_check = now
                if should_stop():
                    stop.set()
                    raise TrainingCancelled("training cancelled")
            if errors or cancelled:
                break
            if not empty:
                continue  # read what is queued before looking at the processes
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or all(p.exitcode == 0 for p in procs):
                break
        drain()  # what the ranks sent before they exited
        time.sleep(0.2 if errors else 0.0)  # a rank killed under the one that reported is the cause
        for r, p in enumerate(procs):
            code = p.exitcode
            if code is not None and code < 0:
                killed.append(f"rank {r} of {devices} was killed by signal {-code}")
            elif code not in (None, 0) and not errors:
                killed.append(f"rank {r} of {devices} exited with code {code}")
    finally:
        stop.set()
        _end(procs, grace_s if not done else min(grace_s, 5.0))
        channel.close()
        channel.cancel_join_thread()
        shutil.rmtree(rendezvous, ignore_errors=True)
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
    outcome, weights = done[0]
    model.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
    return {**outcome, "devices": devices, "device": ",".join(dict.fromkeys(str(d) for d in targets))}


__all__ = ["MAX_DEVICES", "Rank", "RankFailed", "ShardedBatchSampler", "fit_on_devices", "rank_devices"]
