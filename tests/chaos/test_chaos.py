"""Seeded fault trials against a real deployment; the oracle must find nothing.

MEDMAAS_CHAOS_SEED replays a run (the seed is printed); MEDMAAS_CHAOS_TRIALS runs more
trials (default: every fault kind alone once, then one mix of two). A fault kind that still
finds a product violation goes in trials.KNOWN_VIOLATIONS (left out of the CI plan, proven by
a strict xfail test here) until it is fixed; `python -m bench.chaos` runs every kind. The
violations found so far stay here as regression tests."""

from __future__ import annotations

import contextlib
import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, JobState, ModelVersion
from tests.chaos.deployment import Deployment, small_disk
from tests.chaos.observe import JobView, Observer
from tests.chaos.oracle import Verdict, check_score, check_states
from tests.chaos.trials import CI_KINDS, run_chaos, seed_from_env, trials_from_env
from tests.chaos.workload import Accepted, Workload, make_workload
from tests.conftest import ApiClient, create_tenant_key

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_faults_keep_every_job_exactly_once(chaos_deployment: Deployment) -> None:
    run = run_chaos(chaos_deployment, seed_from_env(), trials_from_env(CI_KINDS), kinds=CI_KINDS)
    figures = run.figures()
    print(json.dumps(figures, indent=2))
    assert not run.violations, (
        f"seed {run.seed}: {len(run.violations)} violations:\n"
        + "\n".join(run.violations)
        + "\n"
        + chaos_deployment.logs()
    )


def test_a_database_failover_under_a_running_job_does_not_fail_it(chaos_deployment: Deployment) -> None:
    """Regression (found by seed 2): the job's next progress UPDATE met the terminated backend and
    the OperationalError became the job's error ('Job (sleep) failed: OperationalError: ...
    AdminShutdown'). Five fail-overs under one job with a progress UPDATE every 50 ms."""
    dep = chaos_deployment
    api = ApiClient(dep.app.test_client(), create_tenant_key(dep.app, f"failover-{uuid.uuid4().hex[:6]}")[1])
    job_id = api.submit("sleep", {"seconds": 8, "steps": 160})["id"]  # a progress UPDATE every 50 ms
    observer = Observer(dep.settings.sqlalchemy_url)  # not the API: its own pooled connections die too
    try:
        assert observer.wait_job(job_id, lambda v: v.event_seq >= 5, 120), "the job made no progress"
        for _ in range(5):  # five fail-overs: each one's first statement on a dead connection can fail the job
            dep.terminate_backends()
            time.sleep(0.8)
        done = observer.wait_job(job_id, lambda v: v.terminal, 120)
    finally:
        observer.close()
        dep.database.dispose()  # the next test starts with a web tier whose pool has no dead connections
    assert done is not None, "the job did not end"
    assert done.state == JobState.succeeded, done


@dataclass
class FullDisk:
    """What a train and a score job of one tenant did on a nearly full disk."""

    workload: Workload
    jobs: list[Accepted]
    views: list[JobView]


@pytest.fixture(scope="module")
def full_disk(chaos_deployment: Deployment) -> Iterator[FullDisk]:
    """One tenant's job directories on a tmpfs with ~16 KB free: a train job's checkpoint and a
    score job's part files do not fit. Yields once both jobs ended (the disk has room again)."""
    dep = chaos_deployment
    workload = make_workload(dep.app, dep.settings, random.Random(5), tenants=1)
    jobs_root = dep.settings.artifacts / f"tenant-{workload.tenants[0].id}" / "jobs"
    observer = Observer(dep.settings.sqlalchemy_url)
    try:
        with contextlib.ExitStack() as disk:
            # needs root to mount the tmpfs (CI runs as root): a PermissionError fails the trial
            disk.enter_context(small_disk(jobs_root, size_kb=512, free_kb=16))
            jobs = [workload.train(epochs=2), workload.score()]
            views = [observer.wait_job(job.id, lambda v: v.terminal, 240) for job in jobs]
        assert all(views), f"jobs did not end on a full disk: {views}"
        print(f"full disk: {[(v.id, v.state.value, v.error) for v in views if v]}")
        yield FullDisk(workload, jobs, [v for v in views if v is not None])
    finally:
        observer.close()


def test_a_nearly_full_disk_fails_jobs_cleanly_and_nothing_half_written_is_served(
    chaos_deployment: Deployment, full_disk: FullDisk
) -> None:
    """Each job ends once (failed, or succeeded with a complete result); a failed train job
    registers no version, a failed score job serves no file; with room again the tenant's jobs run."""
    dep = chaos_deployment
    tenant = full_disk.workload.tenants[0]
    observer = Observer(dep.settings.sqlalchemy_url)
    verdict = Verdict()

    def check(s: Session) -> None:
        for acc in full_disk.jobs:
            job = s.get(Job, acc.id)
            assert job is not None
            check_states(verdict, job, observer.events(job.id))
            if job.state == JobState.succeeded:
                if job.kind == "score":
                    check_score(verdict, s, dep.settings, job, full_disk.workload.library_ids)
                continue
            assert job.state == JobState.failed, (job.id, job.state)
            assert job.error, "a failed job without an error"
            if job.kind == "train":
                versions = s.scalars(select(ModelVersion.id).where(ModelVersion.job_id == job.id)).all()
                assert versions == [], f"a failed train job registered {versions}"
            else:
                r = tenant.api.get(f"/api/v1/jobs/{job.id}/result")
                assert r.status_code != 200, "a failed score job serves a result file"

    try:
        observer.read(check)
        assert not verdict.violations, verdict.violations
        after = full_disk.workload.score()  # the disk has room again
        done = observer.wait_job(after.id, lambda v: v.terminal, 240)
    finally:
        observer.close()
    assert done is not None, "the job after the disk has room did not end"
    assert done.state == JobState.succeeded, done


def test_a_job_failed_by_a_full_disk_reports_one_sentence_without_a_traceback(full_disk: FullDisk) -> None:
    """Regression (found by the full-disk trial): a score job's error carried its shard's
    traceback ('... No space left on device Traceback (most recent call last): File
    "/work/main/workers/scoring/runner.py" ...')."""
    for view in full_disk.views:
        if view.state == JobState.failed:
            assert view.error is not None
            assert "\n" not in view.error, view.error
            assert "Traceback" not in view.error, view.error
            assert "/workers/" not in view.error, view.error  # no server paths either
