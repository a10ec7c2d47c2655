"""Tags, the jobs list's filters, comparing runs and cloning a run with changes, through the
API (SQLite, fake broker) and the CLI (against the same app through its test client)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app import auth, jobs
from app.models import AuditEvent, Job, KeyRole, ModelVersion
from tests.conftest import ApiClient, create_tenant_key, flush_read_audit


def run(app, job_id: int, metrics: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """Play a worker: claim the job, report metric events, succeed with `result`."""
    db = app.extensions["medmaas.db"]
    with db.session() as s:
        attempt = jobs.claim(s, job_id, "test-worker")
        assert attempt is not None
        for m in metrics:
            assert jobs.report_event(s, job_id, attempt, "metric", m)
        assert jobs.succeed(s, job_id, attempt, result)


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    return resp.get_json()["error"]


def patch(api: ApiClient, path: str, **kw: Any):
    return api._call("patch", path, **kw)


def key_of(app, role: str) -> tuple[ApiClient, ApiClient]:
    """(a client with an admin key, one with a `role` key) of one new tenant."""
    tenant_id, admin = create_tenant_key(app)
    with app.extensions["medmaas.db"].session() as s:
        _key, secret = auth.new_key(s, tenant_id, role, KeyRole(role))
    client = app.test_client()
    return ApiClient(client, admin), ApiClient(client, secret)


def add_version(app, tenant_id: int, name: str = "sol", version: int = 1) -> None:
    with app.extensions["medmaas.db"].session() as s:
        s.add(
            ModelVersion(
                tenant_id=tenant_id,
                name=name,
                version=version,
                arch="rnn",
                task="regression",
                input_kind="smiles",
                spec={},
                artifact_uri="file:///nowhere",
            )
        )
        s.commit()


# -- tags ------------------------------------------------------------------------------------


def test_job_tags_replace_add_remove_and_show_on_the_job(api: ApiClient, app) -> None:
    job = api.submit("sleep", {"seconds": 0})
    assert job["tags"] == []
    assert job["cloned_from"] is None
    r = api.put(f"/api/v1/jobs/{job['id']}/tags", json={"tags": ["baseline", "paper-2", "baseline"]})
    assert r.status_code == 200
    assert r.get_json()["tags"] == ["baseline", "paper-2"]
    r = patch(api, f"/api/v1/jobs/{job['id']}/tags", json={"add": ["lr:1e-3"], "remove": ["paper-2"]})
    assert r.status_code == 200
    assert r.get_json()["tags"] == ["baseline", "lr:1e-3"]
    assert api.job(job["id"])["tags"] == ["baseline", "lr:1e-3"]
    # audited like its neighbours
    with app.extensions["medmaas.db"].session() as s:
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.object_id == str(job["id"]))).all()
    assert "job.tag.update" in actions


def test_bad_tags_are_422_naming_the_field(api: ApiClient) -> None:
    job = api.submit("sleep", {"seconds": 0})
    err = error_of(api.put(f"/api/v1/jobs/{job['id']}/tags", json={"tags": ["no spaces"]}), 422)
    assert "tags" in str(err["details"])
    assert patch(api, f"/api/v1/jobs/{job['id']}/tags", json={}).get_json()["tags"] == []  # changes nothing
    err = error_of(api.put(f"/api/v1/jobs/{job['id']}/tags", json={"tags": [f"t{i}" for i in range(40)]}), 422)
    assert "tags" in str(err["details"])
    many = [f"t{i}" for i in range(30)]
    assert api.put(f"/api/v1/jobs/{job['id']}/tags", json={"tags": many}).status_code == 200
    err = error_of(patch(api, f"/api/v1/jobs/{job['id']}/tags", json={"add": ["x1", "x2", "x3"]}), 409)
    assert "At most 32" in err["message"]
    assert err["code"] == "too_many_tags"


def test_tags_are_tenant_isolated_and_need_member(app) -> None:
    admin, viewer = key_of(app, "viewer")
    other = ApiClient(app.test_client(), create_tenant_key(app)[1])
    job = admin.submit("sleep", {"seconds": 0})
    assert error_of(viewer.put(f"/api/v1/jobs/{job['id']}/tags", json={"tags": ["a"]}), 403)["code"] == "forbidden"
    assert error_of(other.put(f"/api/v1/jobs/{job['id']}/tags", json={"tags": ["a"]}), 404)["code"] == "not_found"
    assert viewer.job(job["id"])["tags"] == []


def test_model_version_tags(app) -> None:
    tenant_id, key = create_tenant_key(app)
    api = ApiClient(app.test_client(), key)
    add_version(app, tenant_id)
    r = api.put("/api/v1/models/sol/versions/1/tags", json={"tags": ["candidate"]})
    assert r.status_code == 200
    assert r.get_json()["tags"] == ["candidate"]
    r = patch(api, "/api/v1/models/sol/versions/1/tags", json={"add": ["prod"]})
    assert r.get_json()["tags"] == ["candidate", "prod"]
    assert api.get("/api/v1/models/sol/versions/1").get_json()["tags"] == ["candidate", "prod"]
    assert error_of(api.put("/api/v1/models/sol/versions/2/tags", json={"tags": ["x"]}), 404)["code"] == "not_found"
    other = ApiClient(app.test_client(), create_tenant_key(app)[1])
    assert error_of(other.put("/api/v1/models/sol/versions/1/tags", json={"tags": ["x"]}), 404)


# -- filters ---------------------------------------------------------------------------------


def test_jobs_list_filters_by_tag_model_search_kind_and_state(api: ApiClient, app) -> None:
    a = api.submit("sleep", {"seconds": 0, "steps": 3})
    b = api.submit("sleep", {"seconds": 0, "steps": 7})
    c = api.submit("sleep", {"seconds": 1.5, "steps": 7})
    api.put(f"/api/v1/jobs/{a['id']}/tags", json={"tags": ["baseline"]})
    api.put(f"/api/v1/jobs/{c['id']}/tags", json={"tags": ["baseline", "sweep"]})
    run(app, b["id"], [], {"ok": True})
    # a predict-like job that names a model by reference, and a train-like spec by model_name
    db = app.extensions["medmaas.db"]
    tenant_id = api.job(a["id"]) and None
    with db.session() as s:
        tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == a["id"]))
        s.add(Job(tenant_id=tenant_id, kind="score", queue="cpu", spec={"model": "sol@production", "library_id": 1}))
        s.add(
            Job(tenant_id=tenant_id, kind="train", queue="cpu", spec={"model_name": "sol", "model": {"hidden_size": 8}})
        )
        s.add(Job(tenant_id=tenant_id, kind="train", queue="cpu", spec={"model_name": "sol_2"}))
        s.commit()

    def ids(**params: Any) -> list[int]:
        r = api.get("/api/v1/jobs", query_string={**params, "all": "true"})
        assert r.status_code == 200, r.get_json()
        return [j["id"] for j in r.get_json()["items"]]

    assert ids(tag="baseline") == [c["id"], a["id"]]
    assert ids(tag="sweep") == [c["id"]]
    assert ids(tag="nope") == []
    assert ids(tag="baseline", state="queued") == [c["id"], a["id"]]
    assert ids(state="succeeded") == [b["id"]]
    assert ids(search='"steps": 7') == [c["id"], b["id"]]
    assert ids(search="PRODUCTION")
    assert len(ids(search="production")) == 1
    assert ids(search="100%") == []  # a literal %, not a wildcard
    assert len(ids(model="sol")) == 2  # sol@production and model_name sol, not sol_2
    assert len(ids(model="sol_2")) == 1
    assert ids(model="sol", kind="score") == ids(search="sol@production")
    err = error_of(api.get("/api/v1/jobs?tag=bad%20tag"), 422)
    assert "tag" in str(err["details"])
    assert "model" in str(error_of(api.get("/api/v1/jobs?model=a/b"), 422)["details"])


# -- compare ---------------------------------------------------------------------------------


def test_compare_runs_curves_specs_and_final_metrics(api: ApiClient, app) -> None:
    a = api.submit("sleep", {"seconds": 0, "steps": 3})
    b = api.submit("sleep", {"seconds": 0, "steps": 5})
    run(
        app,
        a["id"],
        [{"epoch": e, "train_loss": 1.0 / e, "val_rmse": 2.0 / e, "lr": 0.1, "epoch_seconds": 1.0} for e in (1, 2, 3)],
        {"metrics": {"test": {"rmse": 0.5}, "val": {"rmse": 0.6}, "best_epoch": 3}},
    )
    run(app, b["id"], [{"epoch": e, "train_loss": 2.0 / e} for e in (1, 2)], {"ok": True})
    r = api.get(f"/api/v1/jobs/compare?ids={a['id']},{b['id']}")
    assert r.status_code == 200, r.get_json()
    data = r.get_json()
    assert [j["id"] for j in data["jobs"]] == [a["id"], b["id"]]
    first, _second = data["jobs"]
    assert first["curves"]["train_loss"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3)]]
    assert "lr" not in first["curves"]
    assert "epoch_seconds" not in first["curves"]
    assert data["curve_keys"] == ["train_loss", "val_rmse"]
    spec = {row["key"]: row for row in data["spec"]}
    assert spec["steps"]["values"] == [3, 5]
    assert spec["steps"]["differs"] is True
    assert spec["seconds"]["differs"] is False
    metrics = {row["key"]: row["values"] for row in data["metrics"]}
    # a's result metrics (flattened); b has none, so its curves' last values
    assert metrics["test.rmse"] == [0.5, None]
    assert metrics["best_epoch"] == [3, None]
    assert metrics["train_loss"] == [None, 1.0]
    flush_read_audit(app)
    with app.extensions["medmaas.db"].session() as s:
        details = s.scalars(select(AuditEvent.details).where(AuditEvent.action == "job.compare.read")).all()
    assert details == [{"job_ids": [a["id"], b["id"]]}]  # audited: which runs were read


def test_compare_refuses_bad_ids_and_other_tenants_jobs(api: ApiClient, app) -> None:
    a = api.submit("sleep", {"seconds": 0})
    other = ApiClient(app.test_client(), create_tenant_key(app)[1])
    b = other.submit("sleep", {"seconds": 0})
    assert "ids" in str(error_of(api.get("/api/v1/jobs/compare"), 422)["details"])
    assert "ids" in str(error_of(api.get("/api/v1/jobs/compare?ids=1,x"), 422)["details"])
    assert "ids" in str(error_of(api.get("/api/v1/jobs/compare?ids=" + ",".join(["1"] * 21)), 422)["details"])
    assert error_of(api.get(f"/api/v1/jobs/compare?ids={a['id']},9999999999"), 404)["code"] == "not_found"
    one = api.get(f"/api/v1/jobs/compare?ids={a['id']},{a['id']}")  # repeats dropped; one run shows alone
    assert [j["id"] for j in one.get_json()["jobs"]] == [a["id"]]
    err = error_of(api.get(f"/api/v1/jobs/compare?ids={a['id']},{b['id']}"), 404)
    assert str(b["id"]) in err["message"]


# -- clone -----------------------------------------------------------------------------------


def test_clone_with_changes_records_cloned_from(api: ApiClient, app) -> None:
    src = api.submit("sleep", {"seconds": 0.5, "steps": 4})
    api.put(f"/api/v1/jobs/{src['id']}/tags", json={"tags": ["baseline"]})
    r = api.post(f"/api/v1/jobs/{src['id']}/clone", json={"set": {"steps": 9}})
    assert r.status_code == 202, r.get_json()
    new = r.get_json()
    assert new["id"] != src["id"]
    assert new["kind"] == "sleep"
    assert new["state"] == "queued"
    assert new["cloned_from"] == src["id"]
    assert new["tags"] == []
    assert new["spec"]["steps"] == 9
    assert new["spec"]["seconds"] == 0.5
    # published like any submission
    assert app.extensions["medmaas.db"]
    assert api.job(new["id"])["cloned_from"] == src["id"]
    # no body: the same spec again
    again = api.post(f"/api/v1/jobs/{src['id']}/clone")
    assert again.status_code == 202
    assert again.get_json()["spec"] == src["spec"]
    assert again.get_json()["cloned_from"] == src["id"]
    # a whole edited spec
    r = api.post(f"/api/v1/jobs/{src['id']}/clone", json={"spec": {"seconds": 0, "steps": 2}, "priority": 5})
    assert r.status_code == 202
    assert r.get_json()["spec"]["steps"] == 2
    assert r.get_json()["priority"] == 5
    # idempotent like POST /jobs
    h = {"Idempotency-Key": "clone-1"}
    one = api.post(f"/api/v1/jobs/{src['id']}/clone", json={"set": {"steps": 3}}, headers=h)
    two = api.post(f"/api/v1/jobs/{src['id']}/clone", json={"set": {"steps": 3}}, headers=h)
    assert (one.status_code, two.status_code) == (202, 200)
    assert one.get_json()["id"] == two.get_json()["id"]


def test_clone_refuses_bad_changes_with_422_naming_the_field(api: ApiClient, app) -> None:
    src = api.submit("sleep", {"seconds": 0})
    err = error_of(api.post(f"/api/v1/jobs/{src['id']}/clone", json={"set": {"steps": -1}}), 422)
    assert "steps" in str(err["details"])
    err = error_of(api.post(f"/api/v1/jobs/{src['id']}/clone", json={"set": {"nosuch": 1}}), 422)
    assert "nosuch" in str(err["details"])
    err = error_of(api.post(f"/api/v1/jobs/{src['id']}/clone", json={"set": {"steps.x": 1}}), 422)
    assert "set" in str(err["details"])
    err = error_of(api.post(f"/api/v1/jobs/{src['id']}/clone", json={"set": {"a b": 1}}), 422)
    assert "set" in str(err["details"])
    other = ApiClient(app.test_client(), create_tenant_key(app)[1])
    assert error_of(other.post(f"/api/v1/jobs/{src['id']}/clone", json={}), 404)["code"] == "not_found"


def test_clone_of_a_train_job_drops_what_the_check_added_and_maps_params() -> None:
    from app.kinds import get_kind
    from app.stores.lifecycle import apply_sets, submittable_spec

    kind = get_kind("train")
    assert kind is not None
    stored = {
        "model_name": "m",
        "dataset_id": 1,
        "arch": "rnn",
        "epochs": 10,
        "model": {"hidden_size": 64},
        "dataset_sha256": "ab" * 32,
        "notes": ["x"],
        "init_from_version": "lm@1",
    }
    spec = submittable_spec(kind, stored)
    assert "dataset_sha256" not in spec
    assert "notes" not in spec
    assert "init_from_version" not in spec
    edited = apply_sets(kind, spec, {"epochs": 30, "params.hidden_size": 128, "split.method": "scaffold"})
    assert edited["epochs"] == 30
    assert edited["model"] == {"hidden_size": 128}
    assert edited["split"] == {"method": "scaffold"}
    assert spec["epochs"] == 10


# -- CLI -------------------------------------------------------------------------------------


class _Session:
    """requests.Session-like adapter over the Flask test client, so the CLI's Client talks
    to the app in-process."""

    def __init__(self, client) -> None:
        self.client, self.headers = client, {}

    def request(
        self, method: str, url: str, params=None, json=None, data=None, headers=None, stream=False, timeout=None, **_kw
    ):
        import requests

        path = url.split("://", 1)[-1].split("/", 1)[1]
        resp = self.client.open(
            "/" + path, method=method, query_string=params, json=json, headers={**self.headers, **(headers or {})}
        )
        out = requests.Response()
        out.status_code, out._content = resp.status_code, resp.get_data()
        out.headers.update(dict(resp.headers))
        out.url = url
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def cli(app, monkeypatch):
    from click.testing import CliRunner

    from medmaas import client as client_module
    from medmaas import commands

    tenant_id, key = create_tenant_key(app)
    c = client_module.Client("http://medmaas.test", key)
    c.session = _Session(app.test_client())  # type: ignore[assignment]
    c.session.headers.update({"Authorization": f"Bearer {key}"})
    monkeypatch.setattr(commands, "get_client", lambda: c)
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(commands.client, list(args), catch_exceptions=False)

    return invoke, ApiClient(app.test_client(), key), tenant_id


def test_cli_tag_list_filters_compare_and_clone(cli, app) -> None:
    invoke, api, tenant_id = cli
    a = api.submit("sleep", {"seconds": 0, "steps": 2})
    b = api.submit("sleep", {"seconds": 0, "steps": 6})
    out = invoke("jobs", "tag", str(a["id"]), "baseline", "v1")
    assert out.exit_code == 0, out.output
    assert "baseline" in out.output
    assert api.job(a["id"])["tags"] == ["baseline", "v1"]
    assert invoke("jobs", "tag", str(a["id"]), "--remove", "v1").exit_code == 0
    assert api.job(a["id"])["tags"] == ["baseline"]
    bad = invoke("jobs", "tag", str(a["id"]), "no good")
    assert bad.exit_code == 3
    assert "letters, digits" in bad.output

    listed = invoke("jobs", "list", "--tag", "baseline", "--json")
    assert listed.exit_code == 0, listed.output
    import json

    assert [j["id"] for j in json.loads(listed.output)["items"]] == [a["id"]]
    searched = json.loads(invoke("jobs", "list", "--search", '"steps": 6', "--json").output)
    assert [j["id"] for j in searched["items"]] == [b["id"]]

    run(app, a["id"], [{"epoch": 1, "train_loss": 0.9}], {"ok": True})
    run(app, b["id"], [{"epoch": 1, "train_loss": 0.7}], {"ok": True})
    compared = invoke("jobs", "compare", str(a["id"]), str(b["id"]))
    assert compared.exit_code == 0, compared.output
    assert "steps" in compared.output
    assert "train_loss" in compared.output
    data = json.loads(invoke("jobs", "compare", str(a["id"]), str(b["id"]), "--json").output)
    assert [j["id"] for j in data["jobs"]] == [a["id"], b["id"]]

    cloned = invoke("jobs", "clone", str(a["id"]), "--set", "steps=30", "--set", "seconds=0.5")
    assert cloned.exit_code == 0, cloned.output
    new = api.get("/api/v1/jobs").get_json()["items"][0]
    assert new["cloned_from"] == a["id"]
    assert new["spec"]["steps"] == 30
    assert new["spec"]["seconds"] == 0.5
    assert f"#{new['id']}" in cloned.output
    refused = invoke("jobs", "clone", str(a["id"]), "--set", "steps=-3")
    assert refused.exit_code == 3
    assert "steps" in refused.output

    add_version(app, tenant_id)
    assert invoke("models", "tag", "sol@1", "candidate").exit_code == 0
    assert api.get("/api/v1/models/sol/versions/1").get_json()["tags"] == ["candidate"]
    assert invoke("models", "tag", "sol", "x").exit_code != 0  # NAME@VERSION needed
    card = invoke("models", "card", "sol@1", "--set", "limitations=Small molecules only")
    assert card.exit_code == 0, card.output
    assert "# Model card: sol v1" in card.output
    assert "Small molecules only" in card.output
    as_json = json.loads(invoke("models", "card", "sol@1", "--json").output)
    assert as_json["limitations"] == "Small molecules only"
    assert as_json["tags"] == ["candidate"]


# -- pages -----------------------------------------------------------------------------------


def signed_in(app, client, role: str = "member") -> ApiClient:
    from tests.conftest import sign_in

    tenant_id, admin = create_tenant_key(app)
    with app.extensions["medmaas.db"].session() as s:
        key, _secret = auth.new_key(s, tenant_id, role, KeyRole(role))
        key_id = key.id
    sign_in(app, client, key_id)
    return ApiClient(app.test_client(), admin)


def test_pages_filter_compare_clone_and_tag(app, client) -> None:
    api = signed_in(app, client)
    a = api.submit("sleep", {"seconds": 0, "steps": 3})
    b = api.submit("sleep", {"seconds": 0, "steps": 5})
    run(app, a["id"], [{"epoch": 1, "train_loss": 0.5}], {"ok": True})
    api.put(f"/api/v1/jobs/{b['id']}/tags", json={"tags": ["sweep"]})

    page = client.get("/jobs?tag=sweep").get_data(as_text=True)
    assert f'value="{b["id"]}" form="compare-form"' in page
    assert f'value="{a["id"]}" form="compare-form"' not in page
    listed = client.get("/ui/api/jobs?search=%22steps%22:%203").get_json()
    assert [j["id"] for j in listed["items"]] == [a["id"]]
    assert "Invalid tag" in client.get("/jobs?tag=a%20b", follow_redirects=True).get_data(as_text=True)

    compare = client.get(f"/jobs/compare?ids={a['id']}&ids={b['id']}")
    assert compare.status_code == 200
    html = compare.get_data(as_text=True)
    assert 'data-metric="train_loss"' in html
    assert 'class="differs" data-key="steps"' in html
    assert client.get("/jobs/compare?ids=x").status_code == 422
    assert client.get(f"/ui/api/jobs/compare?ids={a['id']},{b['id']}").get_json()["curve_keys"] == ["train_loss"]

    form = client.get(f"/jobs/{a['id']}/clone").get_data(as_text=True)
    assert "&#34;steps&#34;: 3" in form or '"steps": 3' in form
    r = client.post(
        f"/jobs/{a['id']}/clone",
        data={"csrf_token": "token", "form_id": "f1", "priority": "0", "spec": '{"seconds": 0, "steps": 11}'},
    )
    assert r.status_code == 302, r.get_data(as_text=True)
    new_id = int(r.headers["Location"].rstrip("/").rsplit("/", 1)[1])
    assert api.job(new_id)["cloned_from"] == a["id"]
    assert api.job(new_id)["spec"]["steps"] == 11
    bad = client.post(
        f"/jobs/{a['id']}/clone",
        data={"csrf_token": "token", "form_id": "f2", "priority": "0", "spec": '{"seconds": 0, "steps": -1}'},
    )
    assert bad.status_code == 422
    assert "steps" in bad.get_data(as_text=True)

    detail = client.get(f"/jobs/{new_id}").get_data(as_text=True)
    assert "Run again with changes" in detail
    assert f"job #{a['id']}</a> with changes" in detail
    r = client.post(f"/jobs/{new_id}/tags", data={"csrf_token": "token", "tags": "baseline, v2"})
    assert r.status_code == 302
    assert api.job(new_id)["tags"] == ["baseline", "v2"]


def test_a_viewer_sees_no_edit_forms_and_cannot_post(app, client) -> None:
    api = signed_in(app, client, "viewer")
    a = api.submit("sleep", {"seconds": 0})
    detail = client.get(f"/jobs/{a['id']}").get_data(as_text=True)
    assert 'id="tags-form"' not in detail
    assert "Run again with changes" not in detail
    assert client.post(f"/jobs/{a['id']}/tags", data={"csrf_token": "token", "tags": "x"}).status_code == 403
    assert client.post(f"/jobs/{a['id']}/clone", data={"csrf_token": "token", "spec": "{}"}).status_code == 403


def test_compare_a_searchs_trials(api: ApiClient, app, client) -> None:
    from app.models import ScoreShard, ShardState

    db = app.extensions["medmaas.db"]
    with db.session() as s:
        tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == api.submit("sleep", {"seconds": 0})["id"]))
        search = Job(
            tenant_id=tenant_id,
            kind="search",
            queue="cpu",
            spec={"metric": "rmse", "direction": "minimize", "space": {"lr": {}, "hidden_size": {}}},
        )
        s.add(search)
        s.flush()
        trials = [
            ({"lr": 0.01, "hidden_size": 64}, [1.2, 0.9, 0.8], 0.8, "complete"),
            ({"lr": 0.001, "hidden_size": 64}, [1.3, 1.25], 1.25, "pruned"),
            ({"lr": 0.003, "hidden_size": 128}, [1.1, 0.7, 0.6], 0.6, "complete"),
        ]
        for i, (params, curve, value, state) in enumerate(trials):
            s.add(
                ScoreShard(
                    job_id=search.id,
                    index=i,
                    start_row=i,
                    stop_row=i,
                    state=ShardState.done,
                    stats={"trial": i, "state": state, "value": value, "params": params, "curve": curve},
                )
            )
        s.commit()
        search_id = search.id
    r = api.get(f"/api/v1/jobs/{search_id}/trials/compare?slots=0,2")
    assert r.status_code == 200, r.get_json()
    data = r.get_json()
    assert [j["label"] for j in data["jobs"]] == ["trial 0", "trial 2 (best)"]
    assert data["jobs"][1]["curves"]["rmse"] == [[1, 1.1], [2, 0.7], [3, 0.6]]
    params = {row["key"]: row for row in data["spec"]}
    assert params["lr"]["differs"] is True
    assert params["hidden_size"]["values"] == [64, 128]
    assert {row["key"]: row["values"] for row in data["metrics"]}["rmse"] == [0.8, 0.6]
    assert len(api.get(f"/api/v1/jobs/{search_id}/trials/compare").get_json()["jobs"]) == 3
    assert api.get(f"/api/v1/jobs/{search_id}/trials/compare?slots=7").status_code == 404
    sleep_id = api.get("/api/v1/jobs").get_json()["items"][-1]["id"]
    assert api.get(f"/api/v1/jobs/{sleep_id}/trials/compare").status_code == 404  # not a search
    other = ApiClient(app.test_client(), create_tenant_key(app)[1])
    assert other.get(f"/api/v1/jobs/{search_id}/trials/compare").status_code == 404
    # the page
    from tests.conftest import sign_in

    with db.session() as s:
        key, _secret = auth.new_key(s, tenant_id, "web", KeyRole.viewer)
        key_id = key.id
    sign_in(app, client, key_id)
    html = client.get(f"/jobs/{search_id}/trials/compare").get_data(as_text=True)
    assert "Compare 3 trials" in html
    assert 'data-metric="rmse"' in html
    assert 'class="differs" data-key="lr"' in html
