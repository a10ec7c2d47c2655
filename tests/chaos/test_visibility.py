"""A job that runs longer than the broker's visibility timeout runs once.

Redis hands a delivered, unacknowledged message to another consumer once it is older than
the visibility timeout (MEDMAAS_BROKER_VISIBILITY_TIMEOUT_S, a week by default; kombu looks
for such messages when a worker starts and on a periodic sweep). Here the timeout is two
seconds and a sleep and a train job run far past it; the other worker is restarted meanwhile,
as a deploy or a supervisor would (a starting worker sweeps for such messages), so that the
redelivery surely happens while the job runs. The redelivered message must find the job claimed and be dropped: one running ->
succeeded transition, one attempt, one model version."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, JobState, ModelVersion
from tests.chaos.deployment import Deployment, deployment
from tests.chaos.observe import Observer
from tests.chaos.oracle import Verdict, check_states, check_train
from tests.chaos.workload import Accepted, make_workload

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

VISIBILITY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def short_visibility(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("chaos-visibility")
    with deployment(work, partitionable=False, broker_visibility_timeout_s=VISIBILITY_TIMEOUT_S) as dep:
        yield dep


def redeliveries(dep: Deployment, job_id: int) -> int:
    """Deliveries of the job its worker found already claimed and dropped (every worker's logs)."""
    mark = f"job {job_id}: not claimable (duplicate delivery"
    return sum(w.log_tail(10_000_000).count(mark) for w in dep.workers)


@pytest.mark.parametrize("kind", ["sleep", "train"])
def test_a_job_longer_than_the_visibility_timeout_runs_once(short_visibility: Deployment, kind: str) -> None:
    dep = short_visibility
    assert dep.settings.broker_visibility_timeout_s == VISIBILITY_TIMEOUT_S
    workload = make_workload(dep.app, dep.settings, random.Random(11), tenants=1, client=dep.client)
    observer = Observer(dep.settings.sqlalchemy_url)
    bounced, holder = dep.workers
    try:
        bounced.stop()  # the job goes to the other worker; this one comes back while it runs
        job: Accepted = workload.sleep(seconds=15.0) if kind == "sleep" else workload.train(epochs=100)
        running = observer.wait_job(job.id, lambda v: v.state == JobState.running, 120)
        assert running is not None, f"job {job.id} never ran:\n{dep.logs()}"
        assert running.worker_pid == holder.pid, running
        time.sleep(VISIBILITY_TIMEOUT_S + 0.5)  # the message is now older than the visibility timeout
        bounced.start()  # on its first poll it hands the job's message out again
        dep.wait_workers_ready(timeout=120)
        assert not observer.job(job.id).terminal, "the job ended before the other worker was back: make it longer"
        done = observer.wait_job(job.id, lambda v: v.terminal, 240)
        assert done is not None, f"job {job.id} did not end:\n{dep.logs()}"
        assert redeliveries(dep, job.id) >= 1, "the broker never redelivered the job: the trial proved nothing"
        verdict = Verdict()

        def check(s: Session) -> None:
            row = s.get(Job, job.id)
            assert row is not None
            check_states(verdict, row, observer.events(job.id))
            if kind == "train":
                check_train(verdict, s, row, observer.events(job.id))
                versions = s.scalars(select(ModelVersion.id).where(ModelVersion.job_id == job.id)).all()
                assert len(versions) == 1, versions

        observer.read(check)
    finally:
        observer.close()
    assert done.state == JobState.succeeded, done
    assert done.attempts == 1, f"a redelivered job ran again: {done}"
    assert not verdict.violations, verdict.violations
