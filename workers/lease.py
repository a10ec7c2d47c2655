"""The worker's side of a lease (app/leases.py): a thread that heartbeats one claimed unit
(a job, a scoring shard) and tells the code doing the work when to stop.

    with Lease(db, SHARDS, shard_id, attempt, interval_s, extra=lambda: {"rows_done": n}) as lease:
        for batch in work:
            ...
            if lease.check():          # lost (reaped, cancelled) or its job cancelled/ended
                break

`lost` means this attempt no longer owns the unit: it must not write anything for it.
`cancelled` means its job was cancelled or has ended: stop between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from app import leases
from app.db import Database

log = logging.getLogger(__name__)


class Lease:
    def __init__(
        self,
        db: Database,
        kind: leases.LeaseKind,
        unit_id: int,
        attempt: int,
        interval_s: float,
        *,
        extra: Callable[[], dict[str, Any]] | None = None,
        name: str = "",
    ) -> None:
        self.db, self.kind, self.unit_id, self.attempt = db, kind, unit_id, attempt
        self.interval_s = interval_s
        self.extra = extra  # columns written with every beat, e.g. a shard's rows_done
        self.name = name or f"lease-{kind.name}-{unit_id}"
        self._lost = threading.Event()
        self._cancelled = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = time.monotonic()  # the claim just stamped heartbeat_at

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def beat(self) -> None:
        """One heartbeat now. A DB error is logged and left to the next beat."""
        try:
            with self.db.session() as s:
                beat = leases.heartbeat(
                    s, self.kind, self.unit_id, self.attempt, self.extra() if self.extra is not None else None
                )
        except Exception:
            log.warning("heartbeat of %s %s failed", self.kind.name, self.unit_id, exc_info=True)
            return
        self._last_beat = time.monotonic()
        if not beat.owned:
            self._lost.set()
        elif beat.cancel:
            self._cancelled.set()

    def check(self, poll_s: float | None = None) -> bool:
        """True once the work must stop (lost or cancelled). With poll_s, beat now first if the
        last beat is older than that (a cancel is then seen within poll_s)."""
        if not (self.lost or self.cancelled) and poll_s is not None and time.monotonic() - self._last_beat >= poll_s:
            self.beat()
        return self.lost or self.cancelled

    # -- the heartbeat thread -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()
            if self.lost:
                return

    def start(self) -> Lease:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> Lease:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
