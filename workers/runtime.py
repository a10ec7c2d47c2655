"""What a running job sees: progress/metric reporting, cancel checks, a heartbeat thread."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

from app import jobs
from app.config import Settings
from app.db import Database

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a job when a cancel was requested; the runner records `cancelled`."""


class JobLost(Exception):
    """This attempt no longer owns the job (it was reaped and re-queued elsewhere)."""


class JobContext:
    def __init__(self, db: Database, settings: Settings, job_id: int, attempt: int, tenant_id: int,
                 spec: dict[str, Any], celery: Any = None, worker: str = ""):
        self.db, self.settings, self.job_id, self.attempt = db, settings, job_id, attempt
        self.tenant_id, self.spec, self.celery, self.worker = tenant_id, spec, celery, worker
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop_heartbeat = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_poll = time.monotonic()  # the claim just read the job: no need to poll at once
        self._last_progress = 0.0

    # -- reporting ---------------------------------------------------------------------
    def progress(self, fraction: float, message: str = "", *, force: bool = False, **data: Any) -> None:
        """Record progress; throttled to a few writes a second unless forced or complete."""
        now = time.monotonic()
        if not force and fraction < 1.0 and now - self._last_progress < 0.25:
            return
        self._last_progress = now
        with self.db.session() as s:
            if not jobs.report_progress(s, self.job_id, self.attempt, fraction, message, **data):
                self._on_not_owned(s)

    def event(self, type_: str, data: dict[str, Any]) -> None:
        with self.db.session() as s:
            if not jobs.report_event(s, self.job_id, self.attempt, type_, data):
                self._on_not_owned(s)

    def metric(self, **data: Any) -> None:
        self.event("metric", data)

    def log(self, message: str, **data: Any) -> None:
        self.event("log", {"message": message, **data})

    def _on_not_owned(self, session: Any) -> None:
        state = jobs.heartbeat(session, self.job_id, self.attempt)
        if state is None:
            self._lost.set()
            raise JobLost(f"job {self.job_id} attempt {self.attempt} is no longer ours")

    # -- cancellation ------------------------------------------------------------------
    def should_stop(self) -> bool:
        """True once a cancel is requested. Polls the DB at most once a second."""
        if self._cancel.is_set() or self._lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll >= 1.0:
            self._last_poll = now
            self._beat()
        return self._cancel.is_set() or self._lost.is_set()

    def check_cancel(self) -> None:
        if self.should_stop():
            if self._lost.is_set():
                raise JobLost(f"job {self.job_id} attempt {self.attempt} was taken over")
            raise JobCancelled()

    # -- heartbeat ---------------------------------------------------------------------
    def _beat(self) -> None:
        try:
            with self.db.session() as s:
                cancel = jobs.heartbeat(s, self.job_id, self.attempt)
        except Exception:  # noqa: BLE001  (a DB blip must not kill the job; the next beat retries)
            log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)
            return
        if cancel is None:
            self._lost.set()
        elif cancel:
            self._cancel.set()

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.settings.heartbeat_interval_s):
            self._beat()

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.job_id}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop_heartbeat.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- artifacts ---------------------------------------------------------------------
    def job_dir(self) -> Path:
        path = self.settings.artifacts / f"tenant-{self.tenant_id}" / "jobs" / str(self.job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path
