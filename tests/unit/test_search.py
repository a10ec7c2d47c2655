"""`search` (app/kinds/search.py, workers/kinds/search.py): the spec refuses every bad value
naming its field; trials are units any worker takes, report per epoch, are pruned, resume the
same Optuna trial after a lost worker, are all accounted for, and the best is registered as a
version of the search job; the job page shows the trials."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import select, update

from app.kinds.search import METRIC_DIRECTIONS
from app.models import Job, ModelVersion, ScoreShard, ShardState, utcnow
from tests.conftest import ApiClient
from tests.unit.test_api_datasets_models import upload
from tests.unit.test_api_jobs import assert_error
from tests.unit.test_pretrain import csv_bytes
from tests.unit.test_sessions import login
from workers.kinds import search as search_kind
from workers.scoring import shards
from workers.tasks import execute_job, run_unit

TINY = {"cell": "gru", "embedding_dim": 8, "hidden_size": 16, "dropout": 0.1}
SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "hidden_size": {"type": "int", "low": 8, "high": 32, "step": 8},
    "dropout": {"type": "float", "low": 0.0, "high": 0.4},
}


@pytest.fixture
def mols(api: ApiClient) -> dict:
    r = upload(api, "sequences", "mols.csv", csv_bytes(), label_columns="y")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def search_spec(ds: dict, trials: int = 4, epochs: int = 3, **kw) -> dict:
    train = {
        "model_name": "searched",
        "dataset_id": ds["id"],
        "arch": "rnn",
        "task": "regression",
        "target": "y",
        "epochs": epochs,
        "batch_size": 16,
        "seed": 3,
        "model": TINY,
        "explain_faithfulness": False,
    }
    return {"train": train, "space": SPACE, "budget": {"trials": trials}, "metric": "rmse", **kw}


def details(api: ApiClient, spec: dict) -> dict:
    err = assert_error(api.post("/api/v1/jobs", json={"kind": "search", "spec": spec}), 422)
    return err["details"]["spec"]


def test_every_bad_value_is_a_422_naming_its_field(api: ApiClient, mols: dict) -> None:
    base = search_spec(mols)
    assert details(api, {**base, "space": {"lr": {"low": -1.0, "high": 0.1, "log": True}}}) == {
        "space": {"lr": {"low": ["must be > 0 on a log scale"]}}
    }
    assert "high" in details(api, {**base, "space": {"dropout": {"low": 0.0, "high": 1.5}}})["space"]["dropout"]
    assert "high" in details(api, {**base, "space": {"lr": {"low": 0.1, "high": 0.01}}})["space"]["lr"]
    assert (
        "low"
        in details(api, {**base, "space": {"hidden_size": {"type": "int", "low": 0.5, "high": 8}}})["space"][
            "hidden_size"
        ]
    )
    assert "choices" in details(api, {**base, "space": {"cell": ["gru", "transformer"]}})["space"]["cell"]
    assert (
        "choices"
        in details(api, {**base, "space": {"optimizer": {"type": "categorical", "choices": []}}})["space"]["optimizer"]
    )
    assert "bogus" in details(api, {**base, "space": {"bogus": [1, 2]}})["space"]
    assert (
        "step"
        in details(api, {**base, "space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True, "step": 1e-3}}})["space"][
            "lr"
        ]
    )
    assert "_schema" in details(api, {**base, "space": {}})["space"]
    assert "metric" in details(api, {**base, "metric": "roc_auc"})
    assert "direction" in details(api, {**base, "direction": "up"})
    assert "trials" in details(api, {**base, "budget": {"trials": 0}})["budget"]
    assert "time_s" in details(api, {**base, "budget": {"trials": 2, "time_s": -5}})["budget"]
    assert "pruner" in details(api, {**base, "pruner": "asha2"})
    assert "epochs" in details(api, {**base, "train": {**base["train"], "epochs": 0}})["train"]
    assert "ensemble" in details(api, {**base, "train": {**base["train"], "ensemble": 2}})["train"]
    missing = {**base, "train": {**base["train"], "dataset_id": 999_999}}
    err = assert_error(api.post("/api/v1/jobs", json={"kind": "search", "spec": missing}), 422, "unknown_dataset")
    assert "train" in err["details"]["spec"]
    assert err["message"].startswith("train: ")


def test_metric_directions_follow_the_heads() -> None:
    from workers.ml import heads

    modes = {
        cls.name: cls.metric_modes
        for cls in vars(heads).values()
        if isinstance(cls, type) and getattr(cls, "name", None) in METRIC_DIRECTIONS
    }
    assert set(modes) == set(METRIC_DIRECTIONS)
    for task, metrics in modes.items():
        assert {m: {"min": "minimize", "max": "maximize"}[d] for m, d in metrics.items()} == METRIC_DIRECTIONS[task]


def test_a_search_runs_trials_as_units_prunes_and_registers_the_best(app, api: ApiClient, mols: dict) -> None:
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = api.submit("search", search_spec(mols, trials=6, epochs=4))
    assert job["spec"]["direction"] == "minimize"
    assert job["spec"]["space"]["hidden_size"]["target"] == "model"
    with db.session() as s:  # as the parent creates them; another worker's shard task then takes slot 5
        shards.create_shards(s, job["id"], [(i, i, None) for i in range(6)])
    assert run_unit(db, settings, None, job["id"], 5, "other-host:1") == "done"
    assert run_unit(db, settings, None, job["id"], 5, "other-host:2") == "skipped"  # a duplicate delivery
    assert execute_job(db, settings, None, job["id"]) == "succeeded"

    done = api.job(job["id"])
    result = done["result"]
    counts = result["trials"]
    assert counts["total"] == 6
    assert counts.get("complete", 0) + counts.get("pruned", 0) == 6
    assert counts.get("pruned", 0) >= 1  # successive halving stops the worse trials early
    with db.session() as s:
        slots = shards.shards_of(s, job["id"])
        mv = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job["id"]))
    assert [sl.state for sl in slots] == [ShardState.done] * 6
    assert slots[5].worker == "other-host:1"
    assert sorted(sl.stats["trial"] for sl in slots) == list(range(6))  # one Optuna trial per slot
    assert len({json.dumps(sl.stats["params"], sort_keys=True) for sl in slots}) == 6  # each its own parameters
    pruned = [sl.stats for sl in slots if sl.stats["state"] == "pruned"]
    assert all(len(p["curve"]) < 4 for p in pruned)
    best = min((sl.stats for sl in slots if sl.stats["state"] == "complete"), key=lambda st: st["value"])
    assert result["best"]["trial"] == best["trial"]
    assert result["best"]["value"] == pytest.approx(best["value"])
    # the version is the best trial's model, with the search in its lineage
    assert mv is not None
    assert mv.name == "searched"
    assert result["version"] == mv.version
    assert mv.spec["search"]["job_id"] == job["id"]
    assert mv.spec["search"]["params"] == best["params"]
    assert mv.spec["model"]["hidden_size"] == best["params"]["hidden_size"]
    assert mv.spec["lr"] == pytest.approx(best["params"]["lr"])
    assert mv.metrics["val"]["rmse"] == pytest.approx(best["value"], rel=1e-4)
    # per-epoch metrics name their trial
    metric_events = [e["data"] for e in api.events(job["id"]) if e["type"] == "metric"]
    assert {m["trial"] for m in metric_events} >= {sl.stats["trial"] for sl in slots if sl.index != 5}

    # the page: the trials table, the chart, the best highlighted
    login(api.client, api.key)
    page = api.client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert 'id="trials-table"' in page
    assert 'id="trials-chart"' in page
    assert page.count("<tr data-slot=") == 6
    assert page.count('class="best" aria-current="true"') == 1
    assert 'data-state="pruned"' in page


def test_a_lost_trial_resumes_the_same_optuna_trial_and_a_spent_one_is_accounted_for(
    app, api: ApiClient, mols: dict
) -> None:
    from optuna.trial import TrialState

    from app import leases

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = api.submit("search", {**search_spec(mols, trials=3, epochs=3), "pruner": "none"})
    with db.session() as s:
        shards.create_shards(s, job["id"], [(i, i, None) for i in range(3)])
        j = s.get(Job, job["id"])
        j.max_attempts = 2
    search_job = search_kind.SearchJob.load(db, settings, job["id"])

    # slot 0: its worker stops after the first epoch (as a dead one would), the next attempt resumes
    with db.session() as s:
        claim = shards.claim(s, job["id"], 0, "dying-host")
    checkpoint = search_kind.trial_checkpoint(search_job.job_dir, 0)
    assert search_kind.train_trial(search_job, claim, checkpoint.exists) == "stopped"
    with db.session() as s:
        first = shards.shards_of(s, job["id"])[0].stats
    assert first["state"] == "running"
    assert first["trial"] == 0
    # slot 1: its worker vanished holding it for good (attempts spent): failed, i.e. lost
    with db.session() as s:
        claim1 = shards.claim(s, job["id"], 1, "gone-host")
    study = search_kind.open_study(settings, search_kind.SearchJob.load(db, settings, job["id"]).spec, job["id"])
    ghost = study.ask(search_kind.distributions(search_job.spec))
    ghost.set_user_attr("slot", 1)
    with db.session() as s:
        leases.heartbeat(
            s, leases.SHARDS, claim1.id, claim1.attempt, {"stats": {"trial": ghost.number, "trial_id": ghost._trial_id}}
        )
        s.execute(
            update(ScoreShard)
            .where(ScoreShard.id == claim1.id)
            .values(attempts=2, heartbeat_at=utcnow() - timedelta(seconds=600))
        )
    assert execute_job(db, settings, None, job["id"]) == "succeeded"

    result = api.job(job["id"])["result"]
    assert result["trials"]["total"] == 3
    assert result["trials"].get("lost") == 1
    with db.session() as s:
        slots = shards.shards_of(s, job["id"])
    assert slots[0].state == ShardState.done
    assert slots[0].stats["trial"] == 0
    assert slots[0].stats["state"] == "complete"
    assert len(slots[0].stats["curve"]) == 3
    assert slots[0].attempts == 2
    assert slots[1].state == ShardState.failed
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[ghost.number] == TrialState.FAIL  # accounted for in the study too
    assert not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]


def test_a_time_budget_skips_trials_not_started_in_time(app, api: ApiClient, mols: dict) -> None:
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = api.submit("search", search_spec(mols, trials=3, epochs=1))
    spec = api.job(job["id"])["spec"]
    study = search_kind.open_study(settings, spec, job["id"])
    study.set_user_attr("deadline", 0.0)  # already spent
    assert execute_job(db, settings, None, job["id"]) == "failed"
    done = api.job(job["id"])
    assert "no trial of the search completed (3 skipped)" in done["error"]


def test_cancel_stops_every_trial_and_leaves_none_running(app, api: ApiClient, mols: dict) -> None:
    import threading
    import time

    from optuna.trial import TrialState

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = api.submit("search", {**search_spec(mols, trials=4, epochs=200), "pruner": "none"})
    outcome: list[str] = []
    parent = threading.Thread(target=lambda: outcome.append(execute_job(db, settings, None, job["id"])))
    parent.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with db.session() as s:
            running = [sl for sl in shards.shards_of(s, job["id"]) if sl.state == ShardState.running]
        if running and running[0].stats.get("curve"):
            break
        time.sleep(0.2)
    assert running, "no trial started"
    asked = time.monotonic()
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202
    parent.join(60)
    assert not parent.is_alive()
    assert time.monotonic() - asked < 30
    assert outcome == ["cancelled"]
    assert api.job(job["id"])["state"] == "cancelled"
    with db.session() as s:
        slots = shards.shards_of(s, job["id"])
    assert all(sl.state in (ShardState.cancelled, ShardState.done) for sl in slots), [sl.state for sl in slots]
    study = search_kind.open_study(settings, api.job(job["id"])["spec"], job["id"])
    assert not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]


def test_a_trial_that_breaks_on_every_attempt_is_an_error_not_the_end_of_the_search(
    app, api: ApiClient, mols: dict, monkeypatch
) -> None:
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = api.submit("search", {**search_spec(mols, trials=3, epochs=1), "pruner": "none"})
    with db.session() as s:
        s.get(Job, job["id"]).max_attempts = 1
    calls = []
    real = search_kind.build_member

    def breaks_first(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of luck")
        return real(*args, **kw)

    monkeypatch.setattr(search_kind, "build_member", breaks_first)
    assert execute_job(db, settings, None, job["id"]) == "succeeded"
    result = api.job(job["id"])["result"]
    assert result["trials"] == {"total": 3, "complete": 2, "error": 1}
    assert [r["state"] for r in result["table"]] == ["error", "complete", "complete"]


class FlaskSession(requests.Session):
    """A requests.Session answered by the app's test client: the CLI against the real API."""

    def __init__(self, client) -> None:
        super().__init__()
        self.client = client

    def request(self, method: str, url: str, *args: Any, **kw: Any) -> requests.Response:  # type: ignore[override]
        path = "/" + url.split("://", 1)[1].split("/", 1)[1]
        headers = {**self.headers, **(kw.get("headers") or {})}
        got = self.client.open(path, method=method, json=kw.get("json"), query_string=kw.get("params"), headers=headers)
        resp = requests.Response()
        resp.status_code, resp.url, resp._content = got.status_code, url, got.get_data()
        resp.headers.update(dict(got.headers))
        return resp


def test_the_cli_submits_a_search_from_a_spec_file(api: ApiClient, mols: dict, tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from medmaas import commands
    from medmaas.client import Client

    monkeypatch.setattr(
        commands, "get_client", lambda: Client("http://medmaas.test", api.key, session=FlaskSession(api.client))
    )
    spec_file = tmp_path / "search.json"
    spec_file.write_text(json.dumps(search_spec(mols, trials=2)))
    out = CliRunner().invoke(commands.client, ["submit", "search", "--spec", f"@{spec_file}"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "(search, queued)" in out.output
    bad = search_spec(mols)
    bad["space"] = {"lr": {"low": 0.0, "high": 0.1, "log": True}}
    spec_file.write_text(json.dumps(bad))
    out = CliRunner().invoke(commands.client, ["submit", "search", "--spec", f"@{spec_file}"])
    assert out.exit_code != 0
    assert "space" in out.output, out.output
    assert "log scale" in out.output, out.output


@pytest.mark.parametrize(
    ("pruner", "cls"),
    [("successive_halving", "SuccessiveHalvingPruner"), ("hyperband", "HyperbandPruner"), ("none", "NopPruner")],
)
def test_the_study_lives_in_the_platform_database_with_the_pruner_asked_for(
    app, api: ApiClient, mols: dict, pruner: str, cls: str
) -> None:
    from sqlalchemy import inspect

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = api.submit("search", {**search_spec(mols), "pruner": pruner, "min_resource": 2})
    study = search_kind.open_study(settings, api.job(job["id"])["spec"], job["id"])
    assert type(study.pruner).__name__ == cls
    assert study.direction.name == "MINIMIZE"
    tables = set(inspect(db.engine).get_table_names())
    assert {"studies", "trials", "jobs"} <= tables  # one database: Optuna's tables beside ours
    assert search_kind.open_study(settings, api.job(job["id"])["spec"], job["id"])._study_id == study._study_id
