"""Metering a worker's units of work (a job attempt, a scoring shard): CPU seconds of this
process and its child processes (the scoring pool's RDKit children), and GPU seconds.

A CPU worker runs one unit at a time (solo or prefork pools), but the inference queue's
threads pool runs several in one process, where CPU time cannot be told apart per thread
(torch's own threads do the work). The ledger therefore splits the process's CPU time over
the units running at the same moment: every start and stop settles the time used since the
last one evenly between the units that were running. Alone, a unit gets exactly the CPU time
the process used while it ran; the shares of all units add up to the process's total.

GPU seconds are the unit's wall time when it ran on a CUDA device, told by the CUDA caching
allocator's cumulative allocation count having grown while it ran (0 on CPU, and for a job
that used no GPU memory on a GPU worker).
"""

from __future__ import annotations

import itertools
import logging
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.models import Job, Tenant, UsageMetric
from app.stores import usage as usage_store
from app.stores.usage import Quantity

log = logging.getLogger(__name__)


# Sources of the pids of long-lived child processes that work for this process's units (the
# scoring pool's RDKit children register theirs). Listing them beats scanning every process on
# the machine for this one's children (~15 ms on a busy host, on every predict call).
_CHILD_SOURCES: list[Callable[[], Iterable[int]]] = []


def count_child_processes(source: Callable[[], Iterable[int]]) -> None:
    """Count the CPU time of the running child processes `source()` lists as this process's."""
    _CHILD_SOURCES.append(source)


def process_cpu_seconds() -> float:
    """CPU time (user + system) of this process, all its threads, and its child processes:
    the running ones registered with count_child_processes (psutil) and every one that ended
    and was waited for (getrusage). A child moves from the first sum to the second when it
    ends, so the total only grows."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + ended.ru_utime + ended.ru_stime
    for source in _CHILD_SOURCES:
        for pid in source():
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:  # ended meanwhile: counted by getrusage once waited for
                continue
            total += times.user + times.system
    return total


def cuda_allocations() -> int:
    """How many CUDA allocations this process has made so far (0 without torch or CUDA).
    Only asks torch when a job already imported it and initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    count = 0
    for device in range(torch.cuda.device_count()):
        count += int(torch.cuda.memory_stats(device).get("allocation.all.allocated", 0))
    return count


class CpuLedger:
    """Splits this process's CPU time between the units running at the same time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}
        self._last = 0.0
        self._tokens = itertools.count(1)

    def _settle(self) -> None:
        now = process_cpu_seconds()
        used = max(0.0, now - self._last)
        self._last = now
        if self._running:
            share = used / len(self._running)
            for token in self._running:
                self._running[token] += share

    def start(self) -> int:
        with self._lock:
            self._settle()
            token = next(self._tokens)
            self._running[token] = 0.0
            return token

    def stop(self, token: int) -> float:
        with self._lock:
            self._settle()
            return self._running.pop(token)


LEDGER = CpuLedger()


@dataclass
class Reading:
    cpu_s: float
    wall_s: float
    gpu_s: float

    def quantities(self, model: str = "", version: int = 0) -> list[Quantity]:
        return [
            Quantity(UsageMetric.cpu_seconds, self.cpu_s, model, version),
            Quantity(UsageMetric.gpu_seconds, self.gpu_s, model, version),
        ]


class Meter:
    """Measures one unit of work from start() to stop()."""

    def __init__(self, ledger: CpuLedger = LEDGER) -> None:
        self.ledger = ledger
        self._token: int | None = None
        self._t0 = 0.0
        self._allocs0 = 0
        self.reading: Reading | None = None

    def start(self) -> Meter:
        self._t0 = time.monotonic()
        self._allocs0 = cuda_allocations()
        self._token = self.ledger.start()
        return self

    def stop(self) -> Reading:
        """The reading (the first one again when stopped twice)."""
        if self.reading is None:
            assert self._token is not None, "stop() before start()"
            cpu = self.ledger.stop(self._token)
            wall = time.monotonic() - self._t0
            on_gpu = cuda_allocations() > self._allocs0
            self.reading = Reading(cpu_s=cpu, wall_s=wall, gpu_s=wall if on_gpu else 0.0)
        return self.reading


@contextmanager
def metered() -> Iterator[Meter]:
    meter = Meter().start()
    try:
        yield meter
    finally:
        meter.stop()


def kind_quantities(job: Job, result: dict[str, Any] | None) -> list[Quantity]:
    """What a succeeded job's kind meters besides CPU and GPU time (predictions per model)."""
    if job.kind == "predict":
        from workers.kinds.predict import metered_predictions

        return metered_predictions(job.spec, result)
    return []


def job_usage(job: Job, reading: Reading, result: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A job attempt's usage rows (usage_store.counter_rows), written by the statement that
    records the attempt's outcome: its CPU and GPU seconds and, with the result of a succeeded
    job, its kind's quantities."""
    model, version = usage_store.model_of(job.spec, result)
    quantities = reading.quantities(model, version)
    if result is not None:
        quantities += kind_quantities(job, result)
    return usage_store.counter_rows(job.tenant_id, quantities)


def record(session: Session, tenant_id: int, quantities: list[Quantity]) -> None:
    """Add quantities to the tenant's usage in the caller's transaction, inside a savepoint:
    a metering failure is logged and never undoes the work it meters."""
    try:
        with session.begin_nested():
            usage_store.add(session, tenant_id, quantities)
    except Exception:
        log.exception("recording usage of tenant %s failed: %s", tenant_id, quantities)


class StorageSnapshots:
    """The maintenance tick's record of bytes stored: every tenant's, once per interval (and
    at the first tick), each tenant in its own transaction."""

    def __init__(self, interval_s: float = 3600.0) -> None:
        self.interval_s = interval_s
        self._due = 0.0

    def maybe_run(self, db: Database, settings: Settings) -> int:
        """Snapshot every tenant when due; returns how many were measured."""
        now = time.monotonic()
        if now < self._due:
            return 0
        self._due = now + self.interval_s  # a failing snapshot waits for the next interval too
        with db.session() as s:
            tenant_ids = list(s.scalars(select(Tenant.id)))
        for tenant_id in tenant_ids:
            with db.session() as s:
                usage_store.snapshot_storage(s, settings, tenant_id)
        return len(tenant_ids)
