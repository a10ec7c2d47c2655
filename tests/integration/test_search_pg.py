"""A hyper-parameter search run by real worker processes (PostgreSQL + Redis): its trials are
units of work both workers take, the Optuna study lives in the platform's database (schema
`optuna`), trials are pruned, and a worker SIGKILLed while it trains a trial costs nothing but
time: the slot is reaped, resumed, and every trial is accounted for."""

from __future__ import annotations

import signal

import pytest
import redis
from sqlalchemy import select, text

from app import workers_registry
from app.db import Database
from app.models import Job, JobEvent, JobState, ModelVersion, ScoreShard, ShardState
from tests.conftest import ApiClient, wait_until
from tests.integration.test_training_e2e import upload_file
from tests.unit.test_sessions import login

pytestmark = pytest.mark.integration

TRIALS = 12
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the workers share the machine's cores
ACCOUNTED = {"complete", "pruned", "fail", "lost"}


def test_a_search_on_two_workers_survives_a_killed_worker_and_registers_the_best(
    pg_api: ApiClient,
    pg_settings,
    processes,
    tmp_path,
) -> None:
    from tests.unit.test_augment import frame

    path = tmp_path / "mols.csv"
    frame().to_csv(path, index=False)
    ds = upload_file(pg_api, "sequences", path, label_columns="y")
    procs = processes()
    procs.beat()  # reaps the lost lease and republishes
    workers = [procs.worker("cpu", env=ONE_THREAD), procs.worker("cpu", env=ONE_THREAD)]
    client = redis.Redis.from_url(pg_settings.broker_url)
    try:
        wait_until(
            lambda: len(workers_registry.live_workers(client).get("cpu", ())) >= 2,
            60,
            what="both workers to announce themselves",
        )
    finally:
        client.close()
    train = {"model_name": "searched", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "y",
             "epochs": 4, "batch_size": 8, "seed": 2, "model": {"cell": "gru", "embedding_dim": 8},
             "explain_faithfulness": False}  # fmt: skip
    space = {
        "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
        "hidden_size": {"type": "int", "low": 8, "high": 32, "step": 8},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    }
    # No pruning before epoch 2: every trial runs past its first epoch, the window in which the
    # other worker's trial is killed (a trial pruned at epoch 1 on a tiny dataset ends at once).
    job = pg_api.submit(
        "search",
        {"train": train, "space": space, "budget": {"trials": TRIALS}, "metric": "rmse", "min_resource": 2},
    )

    db = Database(pg_settings.sqlalchemy_url)
    try:
        by_pid = {str(w.pid): w for w in workers}

        def victim() -> tuple[int, str, int] | None:
            """A slot some worker other than the search's own is training past its first epoch,
            that worker, and the slot's Optuna trial number."""
            with db.session() as s:
                parent = s.scalar(select(Job.worker).where(Job.id == job["id"]))
                rows = s.execute(
                    select(ScoreShard.index, ScoreShard.worker, ScoreShard.stats).where(
                        ScoreShard.job_id == job["id"], ScoreShard.state == ShardState.running
                    )
                ).all()
                # past its first epoch: the trial reported a metric (its curve reaches the slot's
                # row only with the next heartbeat)
                reported = {
                    (data or {}).get("slot")
                    for data in s.scalars(
                        select(JobEvent.data).where(JobEvent.job_id == job["id"], JobEvent.type == "metric")
                    )
                }
            for index, worker, stats in rows:
                if worker and worker != parent and worker.split(":")[-1] in by_pid and index in reported:
                    if "trial" in (stats or {}):
                        return index, worker, stats["trial"]
            return None

        index, worker, trial = wait_until(victim, 60, interval=0.05, what="a trial past an epoch on the other worker")
        procs.kill(by_pid[worker.split(":")[-1]], signal.SIGKILL)
        procs.worker("cpu", env=ONE_THREAD)  # back to two workers
        done = pg_api.wait(job["id"], timeout=90)
        assert done["state"] == "succeeded", (done["error"], procs.logs())

        with db.session() as s:
            slots = s.execute(
                select(ScoreShard.index, ScoreShard.state, ScoreShard.stats, ScoreShard.attempts, ScoreShard.worker)
                .where(ScoreShard.job_id == job["id"])
                .order_by(ScoreShard.index)
            ).all()
            mv = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job["id"]))
            optuna_states = s.execute(
                text(
                    "SELECT t.state, count(*) FROM optuna.trials t JOIN optuna.studies st USING (study_id) "
                    "WHERE st.study_name = :name GROUP BY t.state"
                ),
                {"name": f"medmaas-search-{job['id']}"},
            ).all()
            job_state = s.scalar(select(Job.state).where(Job.id == job["id"]))
    finally:
        db.dispose()
    assert job_state == JobState.succeeded
    # every trial accounted for: each slot ended, with its trial's outcome
    assert len(slots) == TRIALS
    assert all(state in (ShardState.done, ShardState.failed) for _, state, *_ in slots), slots
    outcomes = [stats.get("state") if state == ShardState.done else "lost" for _, state, stats, *_ in slots]
    assert set(outcomes) <= ACCOUNTED, outcomes
    assert outcomes.count("pruned") >= 1, outcomes
    killed = slots[index]
    assert killed[3] >= 2 or outcomes[index] == "lost", killed  # the killed worker's slot was tried again
    if killed[1] == ShardState.done:  # the same Optuna trial, resumed and finished by a live worker
        assert killed[2]["trial"] == trial, killed
        assert killed[4] != worker, killed
    # the study in the platform's database: no trial left running
    states = {str(state).lower(): n for state, n in optuna_states}
    assert "running" not in states, states
    assert sum(states.values()) >= TRIALS - outcomes.count("lost"), states
    result = done["result"]
    assert result["trials"]["total"] == TRIALS
    # the best trial is a version of the search job
    assert mv is not None
    assert mv.spec["search"]["job_id"] == job["id"]
    assert mv.spec["search"]["trial"] == result["best"]["trial"]
    best = [stats for _, state, stats, *_ in slots if stats.get("trial") == result["best"]["trial"]]
    assert best[0]["state"] == "complete"
    assert best[0]["value"] == min(st["value"] for _, _, st, *_ in slots if st.get("state") == "complete")

    # its page shows the trials, the best highlighted
    login(pg_api.client, pg_api.key)
    page = pg_api.client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert 'id="trials-table"' in page
    assert page.count("<tr data-slot=") == TRIALS
    assert page.count('class="best" aria-current="true"') == 1
