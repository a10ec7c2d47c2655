"""The oracle is not vacuous: fed the event logs of jobs that broke the contract, it names
each break (no services needed)."""

from __future__ import annotations

from typing import Any

from app.models import Job, JobState
from tests.chaos.observe import Event
from tests.chaos.oracle import Verdict, check_resume, check_states, epochs_by_attempt


def state(seq: int, to: str, attempt: int, **data: Any) -> Event:
    return Event(seq, "state", {"to": to, "attempt": attempt, **data})


def metric(seq: int, epoch: int) -> Event:
    return Event(seq, "metric", {"epoch": epoch})


def judged(job_state: JobState, events: list[Event]) -> list[str]:
    verdict = Verdict()
    job = Job(id=7, state=job_state, event_seq=max(e.seq for e in events))
    check_states(verdict, job, events)
    return verdict.violations


KILLED_ONCE = [
    state(1, "queued", 0),
    state(2, "running", 1),
    metric(3, 1),
    state(4, "queued", 1, reason="worker lost"),
    state(5, "running", 2),
    metric(6, 2),
    state(7, "succeeded", 2, **{"from": "running"}),
]


def test_a_job_killed_once_and_resumed_passes() -> None:
    assert judged(JobState.succeeded, KILLED_ONCE) == []
    assert epochs_by_attempt(KILLED_ONCE) == [(1, [1]), (2, [2])]


def test_a_second_success_a_gap_and_a_skipped_attempt_are_named() -> None:
    twice = [*KILLED_ONCE, state(8, "succeeded", 2, **{"from": "running"})]
    assert any("not exactly one terminal state" in v for v in judged(JobState.succeeded, twice))
    assert any("2 running -> succeeded" in v for v in judged(JobState.succeeded, twice))
    gap = [e for e in KILLED_ONCE if e.seq != 3]
    assert any("without gaps" in v for v in judged(JobState.succeeded, gap))
    skipped = [*KILLED_ONCE[:4], state(5, "running", 3), *KILLED_ONCE[5:]]
    assert any("numbered 1..n" in v for v in judged(JobState.succeeded, skipped))


def test_a_terminal_state_left_again_is_named() -> None:
    events = [state(1, "queued", 0), state(2, "running", 1), state(3, "failed", 1), state(4, "running", 2)]
    assert any("not exactly one terminal state" in v for v in judged(JobState.failed, events))


def test_an_attempt_that_starts_training_over_is_caught() -> None:
    restarted = [*KILLED_ONCE[:5], metric(6, 1), metric(7, 2), state(8, "succeeded", 2, **{"from": "running"})]
    assert epochs_by_attempt(restarted) == [(1, [1]), (2, [1, 2])]
    verdict = Verdict()
    check_resume(verdict, 7, restarted, epochs_asked=2, stopped_early=False)
    assert verdict.violations == ["job 7: attempt 2 restarted at epoch 1 after epoch 1 was checkpointed"]
    resumed = Verdict()
    assert check_resume(resumed, 7, KILLED_ONCE, epochs_asked=2, stopped_early=False) == 1
    assert resumed.violations == []
    short = Verdict()
    check_resume(short, 7, KILLED_ONCE, epochs_asked=3, stopped_early=False)
    assert short.violations == ["job 7: epochs reported end at 2, the spec asks 3"]


def test_an_epoch_checkpointed_but_never_reported_is_named() -> None:
    """Attempt 1 checkpointed epoch 2 and lost its database before reporting it; attempt 2
    resumed after it: epoch 2's metrics are missing from the job's events."""
    unreported = [*KILLED_ONCE[:5], metric(6, 3), state(7, "succeeded", 2, **{"from": "running"})]
    verdict = Verdict()
    check_resume(verdict, 7, unreported, epochs_asked=3, stopped_early=False)
    assert verdict.violations == ["job 7: epochs [2] were trained but never reported"]
    reported_late = [*KILLED_ONCE[:5], metric(6, 2), metric(7, 3), state(8, "succeeded", 2, **{"from": "running"})]
    fine = Verdict()
    check_resume(fine, 7, reported_late, epochs_asked=3, stopped_early=False)
    assert fine.violations == []
