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
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, JobEvent, JobState, ModelVersion
from tests.chaos.deployment import Deployment, Managed, small_disk
from tests.chaos.observe import JobView, Observer
from tests.chaos.oracle import Verdict, check_score, check_states, check_train
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


LATE_REPORT = "checkpointed but not reported by an earlier attempt"  # workers/kinds/train.py's log


def train_cut_off_after_epoch_one(dep: Deployment, workload: Workload, observer: Observer) -> JobView:
    """A train job of 4 epochs on the namespaced worker, cut off from PostgreSQL just after it
    reported epoch 1 until the other worker took it over; its view once it ended."""
    assert dep.pg_forward is not None
    target = dep.partitionable
    assert target is not None
    job = train_on(dep, workload, observer, target, epochs=4)

    def epoch_one(v: JobView) -> bool:
        return v.terminal or any(e.type == "metric" for e in observer.events(job.id))

    assert observer.wait_job(job.id, epoch_one, 120), "epoch 1 was never reported"
    dep.cut_from_postgres()
    try:
        taken = observer.wait_job(job.id, lambda v: v.attempts > 1 or v.terminal, 120)
    finally:
        dep.heal_postgres()
    assert taken is not None, "the job was not taken over"
    done = observer.wait_job(job.id, lambda v: v.terminal, 240)
    assert done is not None, "the job did not end"
    return done


def test_an_epoch_checkpointed_by_an_attempt_cut_off_from_postgres_is_still_reported(
    chaos_deployment: Deployment,
) -> None:
    """Regression (found by seed 2074446646, partition_pg on a train job): an attempt saves an
    epoch's checkpoint and then reports the epoch's metrics. Cut off from PostgreSQL in
    between (or killed there), it never reported them; the attempt that took over resumed
    after that checkpoint, so the epoch's metrics were missing from the job's events for good
    ('epochs reported end at 2, the spec asks 3'). The namespaced worker loses PostgreSQL just
    after reporting epoch 1 of 4: it trains epoch 2 (no database call within an epoch this
    short), checkpoints it and blocks on its report until the job is taken over. Repeated
    until that happened once (the attempt may block on a progress write before epoch 2 ends)."""
    dep = chaos_deployment
    # The CI runs as root: a machine where namespaces cannot be made fails the trial, saying why.
    assert dep.netns is not None, f"network namespaces cannot be made here: {dep.no_netns}"
    workload = make_workload(dep.app, dep.settings, random.Random(3), tenants=1, client=dep.client)
    observer = Observer(dep.settings.sqlalchemy_url)
    verdict = Verdict()
    exercised = 0
    try:
        for _ in range(3):
            done = train_cut_off_after_epoch_one(dep, workload, observer)
            assert done.state == JobState.succeeded, done

            def check(s: Session, job_id: int = done.id) -> None:
                row = s.get(Job, job_id)
                assert row is not None
                events = observer.events(job_id)
                check_states(verdict, row, events)
                check_train(verdict, s, row, events)

            observer.read(check)
            exercised += any(LATE_REPORT in str(e.data.get("message")) for e in observer.events(done.id))
            if exercised:
                break
        for other in workload.jobs:  # those that landed on the other worker end too
            observer.wait_job(other.id, lambda v: v.terminal, 240)
    finally:
        observer.close()
    assert not verdict.violations, verdict.violations
    assert exercised, "no cut-off attempt checkpointed an epoch it had not reported: the trial proved nothing"


def test_an_attempt_cut_off_while_packaging_registers_no_version_after_the_takeover(
    chaos_deployment: Deployment,
) -> None:
    """Regression (found by this trial): the namespaced worker loses PostgreSQL just after its
    attempt reported its last progress before the version's registration (the value a
    reference train job shows: calibration, the bundle, the ONNX check); the job is taken over
    and the link returns at once. The cut-off attempt registered the job's model version about
    0.1 s after the takeover, before the owning attempt got there (which then adopted it): a
    late write past the fence. The one version must be the owning attempt's."""
    dep = chaos_deployment
    # The CI runs as root: a machine where namespaces cannot be made fails the trial, saying why.
    assert dep.netns is not None, f"network namespaces cannot be made here: {dep.no_netns}"
    assert dep.pg_forward is not None
    target = dep.partitionable
    assert target is not None
    workload = make_workload(dep.app, dep.settings, random.Random(4), tenants=1, client=dep.client)
    observer = Observer(dep.settings.sqlalchemy_url)
    try:
        reference = workload.train(epochs=2)
        assert observer.wait_job(reference.id, lambda v: v.terminal, 240)
        last_step = max(
            float(e.data["progress"])
            for e in observer.events(reference.id)
            if e.type == "progress" and float(e.data.get("progress", 0)) < 1.0
        )
        late: list[str] = []
        exercised = False
        for _ in range(3):  # until one cut lands between the last progress and the registration
            job = train_on(dep, workload, observer, target, epochs=2)

            def packaging(v: JobView, job_id: int = job.id) -> bool:
                return v.terminal or any(
                    e.type == "progress" and float(e.data.get("progress", 0)) >= last_step
                    for e in observer.events(job_id)
                )

            assert observer.wait_job(job.id, packaging, 120)
            dep.cut_from_postgres()
            try:
                taken = observer.wait_job(job.id, lambda v: v.attempts > 1 or v.terminal, 120)
            finally:
                dep.heal_postgres()
            done = observer.wait_job(job.id, lambda v: v.terminal, 240)
            assert taken is not None
            assert done is not None
            assert done.state == JobState.succeeded, done
            late += observer.read(lambda s, job_id=job.id: late_versions(s, dep.settings, job_id))
            print(f"cut at progress {last_step}: job {job.id} {done}, late {late}", flush=True)
            if taken.attempts > 1:
                exercised = True
                break
        for other in workload.jobs:
            observer.wait_job(other.id, lambda v: v.terminal, 240)
    finally:
        observer.close()
    assert exercised, "the job ended before every cut: the trial proved nothing"
    assert not late, late


def train_on(dep: Deployment, workload: Workload, observer: Observer, target: Managed, epochs: int) -> Accepted:
    """A train job running on `target` (submitted until one lands there: the other worker is
    busy with the previous one)."""
    for _ in range(4):
        job = workload.train(epochs=epochs)
        running = observer.wait_job(job.id, lambda v: v.state == JobState.running, 120)
        assert running is not None, f"job {job.id} never ran"
        if running.worker_pid == target.pid:
            return job
    pytest.fail(f"no train job ran on worker {target.pid}")


def late_versions(s: Session, settings: Any, job_id: int) -> list[str]:
    """The job's model versions registered after its takeover (attempt 2 running) with a
    bundle written before it: registered by the cut-off attempt, a write past the fence."""
    from app.artifacts import ArtifactStore

    takeover = s.scalars(
        select(JobEvent.ts).where(
            JobEvent.job_id == job_id,
            JobEvent.type == "state",
            JobEvent.data["to"].as_string() == "running",
            JobEvent.data["attempt"].as_integer() == 2,
        )
    ).first()
    if takeover is None:
        return []
    store = ArtifactStore.from_settings(settings)
    out = []
    for v in s.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id)):
        files = [p for p in store.path(v.artifact_uri).rglob("*") if p.is_file()]
        written = datetime.fromtimestamp(min(p.stat().st_mtime for p in files), tz=UTC) if files else None
        if v.created_at > takeover and written is not None and written < takeover:
            out.append(
                f"job {job_id}: version {v.version} registered at {v.created_at}, after the takeover at "
                f"{takeover}, with a bundle the cut-off attempt wrote at {written}"
            )
    return out


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
    workload = make_workload(dep.app, dep.settings, random.Random(5), tenants=1, client=dep.client)
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
