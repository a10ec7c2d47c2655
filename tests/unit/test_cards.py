"""Model cards: written at registration (the train spec's `card`) with the software versions
the worker records, edited later, rendered as JSON and Markdown from the registry, shown on
the model page, and the same for pages' downloads."""

from __future__ import annotations

import platform
from importlib import metadata
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select

from app import auth, cards, jobs
from app.models import Dataset, Job, KeyRole, ModelVersion
from tests.conftest import ApiClient, create_tenant_key, sign_in

METRICS = {
    "val": {"loss": 0.4, "rmse": 0.61},
    "test": {"loss": 0.5, "rmse": 0.72, "r2": 0.8},
    "best_epoch": 7,
    "domain": {
        "threshold": 0.35,
        "test_in_domain_fraction": 0.9,
        "test_error_in_domain": 0.6,
        "test_error_out_of_domain": 1.4,
        "error": "mae",
    },
    "calibration": {"coverage": 0.9, "test_coverage": 0.88, "test_mean_width": 1.2, "normalized": True},
}


def setup_version(app, *, card_spec: dict[str, Any] | None = None) -> tuple[ApiClient, int, int]:
    """A tenant whose member key submitted a (fake) training job that the worker's
    register_version turned into sol v1; returns (api, tenant_id, job_id)."""
    from workers.kinds.train import register_version

    tenant_id, _admin = create_tenant_key(app)
    db = app.extensions["medmaas.db"]
    with db.session() as s:
        _key, secret = auth.new_key(s, tenant_id, "alice-laptop", KeyRole.member)
        ds = Dataset(
            tenant_id=tenant_id,
            name="freesolv",
            kind="sequences",
            filename="f.csv",
            bytes=10,
            sha256="ab" * 32,
            rows=642,
            uri="file:///x",
            schema={},
            stats={},
            options={},
        )
        s.add(ds)
        s.commit()
        dataset_id = ds.id
    api = ApiClient(app.test_client(), secret)
    # a real submission (audited with this key); the spec is a sleep's, the version's spec a train's
    job = api.submit("sleep", {"seconds": 0})
    spec = {
        "model_name": "sol",
        "dataset_id": dataset_id,
        "arch": "rnn",
        "task": "regression",
        "target": "y",
        "epochs": 12,
        "lr": 0.001,
        "batch_size": 32,
        "seed": 3,
        "model": {"hidden_size": 64},
        "split": {"method": "scaffold", "train": 0.8, "val": 0.1, "test": 0.1},
    }
    if card_spec is not None:
        spec["card"] = card_spec
    with db.session() as s:
        dataset = s.get(Dataset, dataset_id)
    with db.session() as s:
        attempt = jobs.claim(s, job["id"], "test-worker")  # only the running attempt registers
    ctx = SimpleNamespace(db=db, job_id=job["id"], tenant_id=tenant_id, attempt=attempt)
    version, created = register_version(
        ctx, spec, dataset, "file:///bundle", METRICS, task="regression", input_kind="smiles"
    )
    assert (version, created) == (1, True)
    with db.session() as s:
        s.get(Job, job["id"]).result = {"data": {"train": 513, "val": 64, "test": 65}}
        s.commit()
    return api, tenant_id, job["id"]


def patch(api: ApiClient, path: str, **kw: Any):
    return api._call("patch", path, **kw)


def test_train_spec_accepts_a_card_and_refuses_a_bad_one(api: ApiClient) -> None:
    r = api.post(
        "/api/v1/jobs",
        json={
            "kind": "train",
            "spec": {"model_name": "m", "dataset_id": 1, "arch": "rnn", "card": {"intended_use": 5, "nonsense": "x"}},
        },
    )
    assert r.status_code == 422
    details = r.get_json()["error"]["details"]["spec"]["card"]
    assert "intended_use" in details
    assert "nonsense" in details
    r = api.post(
        "/api/v1/jobs",
        json={
            "kind": "train",
            "spec": {"model_name": "m", "dataset_id": 999, "arch": "rnn", "card": {"intended_use": "screening"}},
        },
    )
    assert r.status_code == 422
    assert r.get_json()["error"]["code"] == "unknown_dataset"  # the card itself was fine


def test_the_worker_records_the_written_card_and_software_versions(app) -> None:
    setup_version(app, card_spec={"intended_use": "  Rank candidate solvents.  ", "limitations": ""})
    with app.extensions["medmaas.db"].session() as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.name == "sol"))
        card = mv.card
    assert card["intended_use"] == "Rank candidate solvents."
    assert "limitations" not in card  # empty text is not written
    assert card["software"]["python"] == platform.python_version()
    assert card["software"]["torch"] == metadata.version("torch")
    assert card["software"]["rdkit"] == metadata.version("rdkit")
    assert card["software"]["medmaas"] == metadata.version("medmaas")


def test_card_json_has_every_section(app) -> None:
    api, _tenant, job_id = setup_version(app, card_spec={"intended_use": "Rank solvents", "out_of_scope": "Dosing"})
    r = api.get("/api/v1/models/sol/versions/1/card")
    assert r.status_code == 200, r.get_json()
    card = r.get_json()
    assert card["intended_use"] == "Rank solvents"
    assert card["out_of_scope"] == "Dosing"
    assert card["limitations"] is None
    data = card["training_data"]
    assert data["name"] == "freesolv"
    assert data["sha256"] == "ab" * 32
    assert data["rows"] == 642
    assert data["split"] == {"method": "scaffold", "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 3}
    assert data["rows_per_split"] == {"train": 513, "val": 64, "test": 65}
    assert card["metrics"]["test"]["rmse"] == 0.72
    assert card["metrics"]["val"]["rmse"] == 0.61
    assert card["applicability_domain"]["threshold"] == 0.35
    assert card["calibration"]["test_coverage"] == 0.88
    assert card["trained_by"]["key_name"] == "alice-laptop"
    assert card["trained_by"]["tenant"].startswith("t-")
    assert card["training_job_id"] == job_id
    assert card["trained_at"]
    assert card["software"]["python"] == platform.python_version()
    assert card["training"]["epochs"] == 12
    # linked from the version
    assert api.get("/api/v1/models/sol/versions/1").get_json()["card"]["markdown"].endswith("/card.md")


def test_card_markdown_and_json_downloads(app) -> None:
    api, _tenant, _job = setup_version(app, card_spec={"intended_use": "Rank solvents | fast"})
    r = api.get("/api/v1/models/sol/versions/1/card.md")
    assert r.status_code == 200
    assert r.mimetype == "text/markdown"
    assert 'filename="sol-v1-card.md"' in r.headers["Content-Disposition"]
    text = r.get_data(as_text=True)
    for heading in (
        "# Model card: sol v1",
        "## Intended use",
        "## Out-of-scope use",
        "## Limitations",
        "## Training data",
        "## Metrics per split",
        "## Applicability domain",
        "## Software",
    ):
        assert heading in text, heading
    assert "Rank solvents | fast" in text
    assert "| rmse | 0.61 | 0.72 |" in text
    assert "key alice-laptop" in text
    assert "Not written yet." in text  # out of scope
    r = api.get("/api/v1/models/sol/versions/1/card.json")
    assert r.status_code == 200
    assert 'filename="sol-v1-card.json"' in r.headers["Content-Disposition"]
    assert r.get_json()["model"] == "sol"


def test_editing_the_card_needs_member_and_validates(app) -> None:
    api, tenant_id, _job = setup_version(app, card_spec={"intended_use": "Rank solvents"})
    r = patch(
        api, "/api/v1/models/sol/versions/1/card", json={"limitations": "Small molecules only", "intended_use": None}
    )
    assert r.status_code == 200, r.get_json()
    card = r.get_json()
    assert card["limitations"] == "Small molecules only"
    assert card["intended_use"] is None  # cleared, although the train spec had one
    assert card["edited_at"]
    assert "Small molecules only" in api.get("/api/v1/models/sol/versions/1/card.md").get_data(as_text=True)
    unchanged = patch(api, "/api/v1/models/sol/versions/1/card", json={})
    assert unchanged.status_code == 200
    assert unchanged.get_json()["limitations"] == "Small molecules only"
    r = patch(api, "/api/v1/models/sol/versions/1/card", json={"limitations": "x" * 10_001})
    assert r.status_code == 422
    assert "limitations" in str(r.get_json()["error"]["details"])
    with app.extensions["medmaas.db"].session() as s:
        _k, viewer = auth.new_key(s, tenant_id, "v", KeyRole.viewer)
    v = ApiClient(app.test_client(), viewer)
    assert v.get("/api/v1/models/sol/versions/1/card").status_code == 200
    assert patch(v, "/api/v1/models/sol/versions/1/card", json={"limitations": "y"}).status_code == 403
    other = ApiClient(app.test_client(), create_tenant_key(app)[1])
    for path in ("/card", "/card.md", "/card.json"):
        assert other.get(f"/api/v1/models/sol/versions/1{path}").status_code == 404
    assert patch(other, "/api/v1/models/sol/versions/1/card", json={"limitations": "y"}).status_code == 404
    assert api.get("/api/v1/models/sol/versions/2/card").status_code == 404


def test_a_version_without_a_card_renders_what_the_registry_knows(app) -> None:
    tenant_id, _key = create_tenant_key(app)
    with app.extensions["medmaas.db"].session() as s:
        s.add(
            ModelVersion(
                tenant_id=tenant_id,
                name="old",
                version=1,
                arch="cnn",
                task="classification",
                input_kind="image",
                spec={},
                artifact_uri="file:///x",
            )
        )
        s.commit()
        mv = s.scalar(select(ModelVersion).where(ModelVersion.name == "old"))
        card = cards.build(s, mv)
    assert card["software"] is None
    assert card["trained_by"]["key_name"] is None
    text = cards.markdown(card)
    assert "Not recorded." in text
    assert "No metrics were recorded." in text


def test_the_model_page_shows_the_card_and_edits_it(app, client) -> None:
    api, tenant_id, _job = setup_version(app, card_spec={"intended_use": "Rank candidate solvents"})
    with app.extensions["medmaas.db"].session() as s:
        key, _secret = auth.new_key(s, tenant_id, "web", KeyRole.member)
        key_id = key.id
    sign_in(app, client, key_id)
    page = client.get("/models/sol").get_data(as_text=True)
    assert 'id="card-v1"' in page
    assert "Rank candidate solvents" in page
    assert "freesolv" in page
    assert "alice-laptop" in page
    r = client.post(
        "/models/sol/versions/1/card",
        data={
            "csrf_token": "token",
            "out_of_scope": "Clinical dosing",
            "intended_use": "Rank candidate solvents",
            "limitations": "",
        },
    )
    assert r.status_code == 302
    assert api.get("/api/v1/models/sol/versions/1/card").get_json()["out_of_scope"] == "Clinical dosing"
    r = client.post("/models/sol/versions/1/tags", data={"csrf_token": "token", "tags": "candidate, prod"})
    assert r.status_code == 302
    assert api.get("/api/v1/models/sol/versions/1").get_json()["tags"] == ["candidate", "prod"]
    md = client.get("/models/sol/versions/1/card.md")
    assert md.status_code == 200
    assert "Clinical dosing" in md.get_data(as_text=True)
