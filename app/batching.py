"""Records collected by many threads and written in batches by one thread of their own, off
the request path: the online calls' usage and audit rows (workers/inference/records.py) and
the audit rows of reads (app/api/auditing.py ReadTrail).

A write that fails keeps its batch for the next one (up to `max_pending`; beyond that the
oldest are dropped with a logged error) and marks the writer unhealthy until a write
succeeds, so a caller that must not go on without its record can write it itself instead.
What is still pending when the process is killed is lost; `stop` (a graceful exit, also run
at interpreter exit) writes it. The thread starts with the first record, in the process that
adds it, so a writer made before a fork (gunicorn's master) works in each child."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class BatchWriter(Generic[T]):
    """Subclasses write a batch in `write` (raise to keep it for the next try) and may do
    best-effort work after a written batch in `after_write` (failures are logged)."""

    name = "medmaas-batch-writer"
    what = "records"

    def __init__(self, interval_s: float, flush_size: int = 500, max_pending: int = 100_000) -> None:
        self.interval_s, self.flush_size, self.max_pending = interval_s, flush_size, max_pending
        self._pending: list[T] = []
        self._lock = threading.Lock()  # guards _pending
        self._writing = threading.Lock()  # one write at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.healthy = True  # the last write succeeded (or none was tried)

    def write(self, batch: list[T]) -> None:
        raise NotImplementedError

    def after_write(self, batch: list[T]) -> None:
        """Best-effort work once `batch` is written (its failures are logged, never retried)."""

    def add(self, records: list[T]) -> None:
        with self._lock:
            self._ensure_thread()
            self._pending.extend(records)
            if len(self._pending) > self.max_pending:
                dropped = len(self._pending) - self.max_pending
                del self._pending[:dropped]
                log.error("dropped %d unwritten %s (the database is failing)", dropped, self.what)
            if len(self._pending) >= self.flush_size:
                self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def start(self) -> None:
        with self._lock:
            self._ensure_thread()

    def _ensure_thread(self) -> None:  # with the lock held; a fork or `stop` leaves none
        if self._pid == os.getpid() and self._thread is not None:
            return
        if self._pid == 0:
            atexit.register(self.stop)
        self._pid = os.getpid()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()

    def stop(self) -> None:
        """Stop the thread and write what is pending (once more if that fails)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(timeout=10)
        self._thread = None
        self.flush()

    def flush(self) -> int:
        """Write what is pending now, after any write in progress (so what was added before the
        call is written when it returns, unless the write fails); returns how many were written."""
        with self._writing:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return 0
            try:
                self.write(batch)
            except Exception:
                log.warning("writing %d %s failed; retrying", len(batch), self.what, exc_info=True)
                self.healthy = False
                with self._lock:
                    self._pending[:0] = batch
                return 0
            self.healthy = True
        try:
            self.after_write(batch)
        except Exception:
            log.warning("after writing %d %s", len(batch), self.what, exc_info=True)
        return len(batch)
