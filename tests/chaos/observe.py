"""Read-only views of the deployment's database for the injector and the oracle, on a pool of
their own that rides out the faults (a query that meets a terminated backend is retried)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.db import Database
from app.models import TERMINAL_STATES, Job, JobEvent, JobState

T = TypeVar("T")


@dataclass(frozen=True)
class JobView:
    id: int
    state: JobState
    attempts: int
    worker: str | None
    event_seq: int
    error: str | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def worker_pid(self) -> int | None:
        """The pid in a worker name host:pid[:gpuN]."""
        if not self.worker:
            return None
        parts = self.worker.split(":")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict[str, Any]


class Observer:
    def __init__(self, url: str) -> None:
        self.db = Database(url)

    def read(self, query: Callable[[Session], T], retry_s: float = 60.0) -> T:
        deadline = time.monotonic() + retry_s
        while True:
            try:
                with self.db.session() as s:
                    return query(s)
            except DBAPIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def job(self, job_id: int) -> JobView:
        def q(s: Session) -> JobView:
            j = s.get(Job, job_id)
            assert j is not None, f"job {job_id} is gone"
            return JobView(j.id, j.state, j.attempts, j.worker, j.event_seq, j.error)

        return self.read(q)

    def events(self, job_id: int, after: int = 0) -> list[Event]:
        def q(s: Session) -> list[Event]:
            rows = s.execute(
                select(JobEvent.seq, JobEvent.type, JobEvent.data)
                .where(JobEvent.job_id == job_id, JobEvent.seq > after)
                .order_by(JobEvent.seq)
            ).all()
            return [Event(seq, type_, dict(data or {})) for seq, type_, data in rows]

        return self.read(q)

    def wait_job(self, job_id: int, until: Callable[[JobView], bool], timeout: float) -> JobView | None:
        deadline = time.monotonic() + timeout
        while True:
            view = self.job(job_id)
            if until(view):
                return view
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def running_again_after(self, job_id: int, seq: int) -> bool:
        """Whether the job made progress after event `seq`: any event but a return to queued
        (the reaper's), i.e. a new attempt started, reported, or the job ended."""
        return any(
            not (e.type == "state" and e.data.get("to") == JobState.queued.value) for e in self.events(job_id, seq)
        )

    def close(self) -> None:
        self.db.dispose()
