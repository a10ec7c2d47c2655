"""What a running job sees: progress/metric reporting, cancel checks, its lease (a heartbeat
thread, workers/lease.py), its artifact and scratch directories."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from app import artifacts, jobs
from app.config import Settings
from app.db import Database
from app.notify import EventHub
from workers.lease import Lease

log = logging.getLogger(__name__)

SCRATCH = "scratch"


def lost_database_connection(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a database connection dropped under the statement."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def scratch_dir(settings: Settings, tenant_id: int, job_id: int) -> Path:
    """Files a job needs only while it runs (a scoring job's part files and decompressed
    library): deleted when the job ends, by the job itself or by the maintenance tick."""
    return artifacts.job_dir(settings, tenant_id, job_id) / SCRATCH


def remove_scratch(settings: Settings, tenant_id: int, job_id: int, *, only_if_empty: bool = False) -> None:
    """Delete a job's scratch directory (only_if_empty: just the empty directories a late
    unit of an ended job may have re-created)."""
    path = scratch_dir(settings, tenant_id, job_id)
    if not only_if_empty:
        artifacts.remove(path)
        return
    subdirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for sub in [*subdirs, path]:  # deepest first; a directory with files in it stays
        with contextlib.suppress(OSError):
            sub.rmdir()


class JobCancelled(Exception):
    """Raised inside a job when a cancel was requested; the runner records `cancelled`."""


class JobLost(Exception):
    """This attempt no longer owns the job (it was reaped and re-queued elsewhere)."""


class JobContext:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        job_id: int,
        attempt: int,
        tenant_id: int,
        spec: dict[str, Any],
        celery: Any = None,
        worker: str = "",
        hub: EventHub | None = None,
    ) -> None:
        self.db, self.settings, self.job_id, self.attempt = db, settings, job_id, attempt
        self.tenant_id, self.spec, self.celery, self.worker = tenant_id, spec, celery, worker
        self.hub = hub  # wakes a job waiting on others' work (a scoring parent on its shards)
        self.lease = Lease(db, jobs.LEASE, job_id, attempt, settings.heartbeat_interval_s, name=f"heartbeat-{job_id}")
        self._last_progress = 0.0
        self.final_report: jobs.Report | None = None  # the report of completion, held back

    @property
    def lost(self) -> bool:
        """This attempt no longer owns the job (reaped and re-queued, or ended elsewhere)."""
        return self.lease.lost

    @property
    def cancelled(self) -> bool:
        """A cancel was requested for the job."""
        return self.lease.cancelled

    # -- reporting ---------------------------------------------------------------------
    def progress(self, fraction: float, message: str = "", *, force: bool = False, **data: Any) -> None:
        """Record progress; throttled to a few writes a second unless forced. A report of
        completion (fraction 1.0) is held back (`final_report`) and written by the statement
        that records the job's outcome, not in a transaction of its own."""
        if fraction >= 1.0:
            self.final_report = jobs.Report(fraction, message, data)
            return
        now = time.monotonic()
        if not force and now - self._last_progress < 0.25:
            return
        self._last_progress = now
        report = jobs.report_progress
        ok = self.db.run(lambda s: report(s, self.job_id, self.attempt, fraction, message, **data), one_statement=True)
        if not ok:
            self._on_not_owned()

    def event(self, type_: str, data: dict[str, Any]) -> None:
        ok = self.db.run(lambda s: jobs.report_event(s, self.job_id, self.attempt, type_, data), one_statement=True)
        if not ok:
            self._on_not_owned()

    def metric(self, **data: Any) -> None:
        self.event("metric", data)

    def log(self, message: str, **data: Any) -> None:
        self.event("log", {"message": message, **data})

    def _on_not_owned(self) -> None:
        self.lease.beat()
        if self.lease.lost:
            raise JobLost(f"job {self.job_id} attempt {self.attempt} is no longer ours")

    # -- cancellation ------------------------------------------------------------------
    def should_stop(self, poll_s: float = 1.0) -> bool:
        """True once a cancel is requested or the job was lost. Asks the DB at most once every
        poll_s (the heartbeat thread also sets the flags)."""
        return self.lease.check(poll_s)

    def check_cancel(self, poll_s: float = 1.0) -> None:
        if self.should_stop(poll_s):
            if self.lost:
                raise JobLost(f"job {self.job_id} attempt {self.attempt} was taken over")
            raise JobCancelled()

    # -- heartbeat ---------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        self.lease.start()

    def stop_heartbeat(self) -> None:
        self.lease.stop()

    # -- artifacts ---------------------------------------------------------------------
    def job_dir(self) -> Path:
        path = artifacts.job_dir(self.settings, self.tenant_id, self.job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def scratch_dir(self) -> Path:
        return scratch_dir(self.settings, self.tenant_id, self.job_id)
