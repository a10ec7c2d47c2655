"""Erasure (issue 11, item 4): DELETE for datasets, model versions, whole models and jobs
removes their rows and their files; 409 naming the blocking jobs while a queued or running
job uses the object; 404 across tenants; 403 for viewers; aliases of a deleted version go;
predict after the deletion is a 404 and the worker's cached weights are dropped; the pages'
confirmation step and the CLI's delete commands."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import func, select

from app import auth
from app import jobs as state_machine
from app.artifacts import ArtifactStore, job_dir
from app.kinds import KINDS, SpecError
from app.models import Dataset, Job, JobEvent, KeyRole, ModelAlias, ModelVersion, ScoreShard, ShardState
from app.stores import datasets as datasets_store
from app.stores import erasure
from app.stores import jobs as jobs_store
from medmaas import commands
from medmaas.client import Client
from tests.conftest import ApiClient
from tests.unit.test_api_jobs import assert_error

ROOT = Path(__file__).resolve().parents[2]
SOLUBILITY = (ROOT / "examples" / "solubility.csv").read_bytes()


class Tenant:
    """A tenant with a member key (api) and a viewer key (viewer)."""

    def __init__(self, app, client, name: str) -> None:
        self.app = app
        with app.extensions["medmaas.db"].session() as s:
            self.id = auth.create_tenant(s, name).id
            _key, member = auth.new_key(s, self.id, "member", KeyRole.member)
            _key, viewer = auth.new_key(s, self.id, "viewer", KeyRole.viewer)
        self.member_secret, self.viewer_secret = member, viewer
        self.api, self.viewer = ApiClient(client, member), ApiClient(client, viewer)

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.app.extensions["medmaas.settings"].artifacts)

    def upload(self, payload: bytes = SOLUBILITY, kind: str = "sequences", name: str = "sol.csv") -> dict:
        data = {"kind": kind, "file": (io.BytesIO(payload), name)}
        if kind == "sequences":
            data["label_columns"] = "solubility"
        r = self.api.post("/api/v1/datasets", data=data, content_type="multipart/form-data")
        assert r.status_code == 201, r.get_json()
        return r.get_json()

    def add_version(self, name: str, version: int, dataset_id: int | None = None, bundle: Path | None = None) -> Path:
        """A registered version whose bundle directory holds (placeholder) files, unless given."""
        if bundle is None:
            bundle = self.store.new_dir(self.id, f"models/{name}")
            (bundle / "model.safetensors").write_bytes(b"weights")
            (bundle / "config.json").write_text("{}")
        with self.app.extensions["medmaas.db"].session() as s:
            s.add(
                ModelVersion(
                    tenant_id=self.id,
                    name=name,
                    version=version,
                    arch="rnn",
                    task="regression",
                    input_kind="smiles",
                    spec={"max_len": 64},
                    dataset_id=dataset_id,
                    artifact_uri=self.store.url(bundle),
                )
            )
        return bundle

    def delete(self, path: str, who: ApiClient | None = None):
        return (who or self.api)._call("delete", path)


@pytest.fixture
def lab(app, client) -> Tenant:
    return Tenant(app, client, "lab")


@pytest.fixture
def other(app, client) -> Tenant:
    return Tenant(app, client, "other")


def dataset_dir(ds_id: int, app) -> Path:
    with app.extensions["medmaas.db"].session() as s:
        uri = s.get(Dataset, ds_id).uri
    return ArtifactStore(app.extensions["medmaas.settings"].artifacts).path(uri).parent


def count(app, model: Any, *where: Any) -> int:
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def train_spec(ds_id: int) -> dict:
    return {
        "model_name": "sol",
        "dataset_id": ds_id,
        "arch": "rnn",
        "task": "regression",
        "target": "solubility",
        "epochs": 1,
    }


# -- datasets ------------------------------------------------------------------------------


def test_deleting_a_dataset_removes_its_row_and_files_and_its_models_keep_working(app, lab: Tenant) -> None:
    ds = lab.upload()
    directory = dataset_dir(ds["id"], app)
    assert files_under(directory)
    bundle = lab.add_version("sol", 1, dataset_id=ds["id"])

    r = lab.delete(f"/api/v1/datasets/{ds['id']}")
    assert r.status_code == 204 and r.get_data() == b""
    assert_error(lab.api.get(f"/api/v1/datasets/{ds['id']}"), 404, "not_found")
    assert count(app, Dataset) == 0
    assert not directory.exists()
    tenant_root = lab.store.root / f"tenant-{lab.id}"
    assert files_under(tenant_root / "datasets") == [] and files_under(tenant_root / "trash") == []
    version = lab.api.get("/api/v1/models/sol/versions/1")
    assert version.status_code == 200 and version.get_json()["dataset_id"] is None
    assert files_under(bundle)  # the model's files are not the dataset's
    assert_error(lab.delete(f"/api/v1/datasets/{ds['id']}"), 404)  # once


def test_deleting_an_image_dataset_leaves_nothing_under_the_tenants_datasets(app, lab: Tenant) -> None:
    ds = lab.upload((ROOT / "examples" / "digits.npz").read_bytes(), kind="images", name="digits.npz")
    datasets_dir = lab.store.root / f"tenant-{lab.id}" / "datasets"
    assert files_under(datasets_dir)
    assert lab.delete(f"/api/v1/datasets/{ds['id']}").status_code == 204
    assert files_under(datasets_dir) == []
    assert list(datasets_dir.iterdir()) == []


def test_a_dataset_named_by_a_queued_job_is_409_naming_the_job_until_it_is_cancelled(app, lab: Tenant) -> None:
    ds = lab.upload()
    job = lab.api.submit("train", train_spec(ds["id"]))
    err = assert_error(lab.delete(f"/api/v1/datasets/{ds['id']}"), 409, "in_use")
    assert err["details"] == {"job_ids": [job["id"]]} and f"{job['id']}" in err["message"], err
    assert count(app, Dataset) == 1 and files_under(dataset_dir(ds["id"], app))

    assert lab.api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202
    assert lab.delete(f"/api/v1/datasets/{ds['id']}").status_code == 204
    assert count(app, Dataset) == 0


def test_a_library_being_scored_blocks_its_deletion(app, lab: Tenant) -> None:
    lib = lab.upload(b"CCO m1\nc1ccccc1 m2\n", kind="library", name="lib.smi")
    lab.add_version("sol", 1)
    job = lab.api.submit("score", {"model": "sol@1", "library_id": lib["id"]})
    err = assert_error(lab.delete(f"/api/v1/datasets/{lib['id']}"), 409, "in_use")
    assert err["details"]["job_ids"] == [job["id"]]
    err = assert_error(lab.delete("/api/v1/models/sol/versions/1"), 409, "in_use")  # the model too
    assert err["details"]["job_ids"] == [job["id"]]


# -- model versions and models ---------------------------------------------------------------


def test_deleting_a_version_removes_its_files_and_the_aliases_pointing_at_it(app, lab: Tenant) -> None:
    v1, v2 = lab.add_version("sol", 1), lab.add_version("sol", 2)
    assert lab.api.put("/api/v1/models/sol/aliases/stable", json={"version": 1}).status_code == 403
    with app.extensions["medmaas.db"].session() as s:  # aliases are an admin's; set them directly
        s.add_all(
            [
                ModelAlias(tenant_id=lab.id, name="sol", alias=a, version=v)
                for a, v in (("stable", 1), ("production", 2), ("canary", 2))
            ]
        )

    assert lab.delete("/api/v1/models/sol/versions/2").status_code == 204
    detail = lab.api.get("/api/v1/models/sol").get_json()
    assert [v["version"] for v in detail["versions"]] == [1] and detail["aliases"] == {"stable": 1}
    assert not v2.exists() and files_under(v1)
    assert_error(lab.api.get("/api/v1/models/sol/versions/2"), 404)
    assert_error(lab.api.get("/api/v1/models/sol/versions/2/files/weights"), 404)
    assert_error(lab.api.post("/api/v1/models/sol/predict", json={"inputs": ["CCO"], "alias": "production"}), 404)
    assert_error(lab.api.post("/api/v1/models/sol/predict", json={"inputs": ["CCO"], "version": 2}), 404)
    assert_error(lab.delete("/api/v1/models/sol/versions/2"), 404)


def test_deleting_a_whole_model_removes_every_version_alias_and_directory(app, lab: Tenant) -> None:
    bundles = [lab.add_version("sol", 1), lab.add_version("sol", 2)]
    keep = lab.add_version("other-model", 1)
    with app.extensions["medmaas.db"].session() as s:
        s.add(ModelAlias(tenant_id=lab.id, name="sol", alias="production", version=1))

    assert lab.delete("/api/v1/models/sol").status_code == 204
    assert_error(lab.api.get("/api/v1/models/sol"), 404)
    assert count(app, ModelVersion, ModelVersion.name == "sol") == 0
    assert count(app, ModelAlias) == 0
    assert not any(b.exists() for b in bundles)
    assert not (lab.store.root / f"tenant-{lab.id}" / "models" / "sol").exists()  # its name is gone too
    assert files_under(keep)
    assert [m["name"] for m in lab.api.get("/api/v1/models").get_json()["items"]] == ["other-model"]
    assert_error(lab.delete("/api/v1/models/sol"), 404)


def test_a_version_used_by_a_queued_predict_job_is_409_until_it_is_cancelled(app, lab: Tenant) -> None:
    lab.add_version("sol", 1)
    lab.add_version("sol", 2)
    r = lab.api.post("/api/v1/models/sol/predict", json={"inputs": ["CCO"], "version": 1, "timeout": 0})
    assert r.status_code == 202
    job_id = r.get_json()["id"]
    for path in ("/api/v1/models/sol/versions/1", "/api/v1/models/sol"):
        err = assert_error(lab.delete(path), 409, "in_use")
        assert err["details"] == {"job_ids": [job_id]} and str(job_id) in err["message"]
    assert lab.delete("/api/v1/models/sol/versions/2").status_code == 204  # another version is free
    lab.api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert lab.delete("/api/v1/models/sol/versions/1").status_code == 204


def test_a_whole_model_is_in_use_while_a_job_trains_a_new_version_of_it(app, lab: Tenant) -> None:
    ds = lab.upload()
    lab.add_version("sol", 1)
    job = lab.api.submit("train", train_spec(ds["id"]))
    assert assert_error(lab.delete("/api/v1/models/sol"), 409, "in_use")["details"] == {"job_ids": [job["id"]]}
    assert lab.delete("/api/v1/models/sol/versions/1").status_code == 204  # a single version is not


# -- jobs ------------------------------------------------------------------------------------


def test_deleting_a_finished_job_removes_its_row_events_shards_and_directory(app, lab: Tenant) -> None:
    settings = app.extensions["medmaas.settings"]
    job = lab.api.submit("sleep", {"seconds": 0})
    err = assert_error(lab.delete(f"/api/v1/jobs/{job['id']}"), 409, "job_active")
    assert err["details"]["job_ids"] == [job["id"]] and "cancel it first" in err["message"]

    directory = job_dir(settings, lab.id, job["id"])
    (directory / "scratch").mkdir(parents=True)
    (directory / "checkpoint.pt").write_bytes(b"state")
    (directory / "scratch" / "part-0.parquet").write_bytes(b"rows")
    with app.extensions["medmaas.db"].session() as s:
        s.add(ScoreShard(job_id=job["id"], index=0, start_row=0, stop_row=10, state=ShardState.done))
    bundle = lab.add_version("sol", 1)
    with app.extensions["medmaas.db"].session() as s:
        s.scalar(select(ModelVersion)).job_id = job["id"]  # the version this job trained
    lab.api.post(f"/api/v1/jobs/{job['id']}/cancel")

    assert lab.delete(f"/api/v1/jobs/{job['id']}").status_code == 204
    assert_error(lab.api.get(f"/api/v1/jobs/{job['id']}"), 404)
    assert_error(lab.api.get(f"/api/v1/jobs/{job['id']}/events"), 404)
    assert count(app, Job) == 0 and count(app, JobEvent) == 0 and count(app, ScoreShard) == 0
    assert not directory.exists()
    version = lab.api.get("/api/v1/models/sol/versions/1").get_json()
    assert version["job_id"] is None and files_under(bundle)  # the model it trained stays


def test_a_running_job_is_409_and_stays(app, lab: Tenant) -> None:
    job = lab.api.submit("sleep", {"seconds": 0})
    with app.extensions["medmaas.db"].session() as s:
        assert state_machine.claim(s, job["id"], "w") is not None
    err = assert_error(lab.delete(f"/api/v1/jobs/{job['id']}"), 409, "job_active")
    assert err["details"]["state"] == "running"
    assert lab.api.job(job["id"])["state"] == "running"


# -- tenants and roles -----------------------------------------------------------------------


def test_another_tenants_objects_are_404_and_untouched(app, lab: Tenant, other: Tenant) -> None:
    ds = lab.upload()
    bundle = lab.add_version("sol", 1)
    job = lab.api.submit("sleep", {"seconds": 0})
    lab.api.post(f"/api/v1/jobs/{job['id']}/cancel")
    with app.extensions["medmaas.db"].session() as s:
        admin = auth.new_key(s, other.id, "root", KeyRole.admin)[1]
    for path in (
        f"/api/v1/datasets/{ds['id']}",
        "/api/v1/models/sol/versions/1",
        "/api/v1/models/sol",
        f"/api/v1/jobs/{job['id']}",
    ):
        assert_error(other.delete(path, ApiClient(other.api.client, admin)), 404, "not_found")
    assert count(app, Dataset) == count(app, ModelVersion) == count(app, Job) == 1
    assert files_under(dataset_dir(ds["id"], app)) and files_under(bundle)


def test_a_viewer_key_gets_403_and_deletes_nothing(app, lab: Tenant) -> None:
    ds = lab.upload()
    lab.add_version("sol", 1)
    job = lab.api.submit("sleep", {"seconds": 0})
    lab.api.post(f"/api/v1/jobs/{job['id']}/cancel")
    for path in (
        f"/api/v1/datasets/{ds['id']}",
        "/api/v1/models/sol/versions/1",
        "/api/v1/models/sol",
        f"/api/v1/jobs/{job['id']}",
    ):
        err = assert_error(lab.delete(path, lab.viewer), 403, "forbidden")
        assert err["details"] == {"required_role": "member", "key_role": "viewer"}
    assert count(app, Dataset) == count(app, ModelVersion) == count(app, Job) == 1


# -- predict after deletion: 404, and no cached weights served ----------------------------


def tiny_bundle(store: ArtifactStore, tenant_id: int) -> Path:
    import numpy as np
    import pandas as pd
    import torch

    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.data import load_sequence_frame
    from workers.ml.models import build_model

    smiles = ["CCO", "CCN", "c1ccccc1", "CC(=O)O", "CCCC", "CCCl", "OCCO", "CC#N", "C1CCCCC1", "CCOC"] * 3
    data = load_sequence_frame(
        pd.DataFrame({"smiles": smiles, "y": np.linspace(0, 1, len(smiles))}), target_columns="y", task="regression"
    )
    torch.manual_seed(0)
    model = build_model(
        "rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": 8, "embedding_dim": 4}
    )
    return save_bundle(store.new_dir(tenant_id, "models/tiny"), model, bundle_config(model, data))


def test_predict_after_deleting_the_version_is_404_and_the_cached_model_is_dropped(app, lab: Tenant) -> None:
    from workers import model_cache
    from workers.tasks import execute_job

    settings, db = app.extensions["medmaas.settings"], app.extensions["medmaas.db"]
    bundle = lab.add_version("tiny", 1, bundle=tiny_bundle(lab.store, lab.id))
    model_cache.clear()
    r = lab.api.post("/api/v1/models/tiny/predict", json={"inputs": ["CCO", "c1ccccc1"], "timeout": 0})
    assert r.status_code == 202
    assert execute_job(db, settings, None, r.get_json()["id"]) == "succeeded"  # the inference worker's run
    assert len(lab.api.get(f"/api/v1/jobs/{r.get_json()['id']}/result").get_json()["predictions"]) == 2
    assert model_cache.cached(bundle)

    assert lab.delete("/api/v1/models/tiny/versions/1").status_code == 204
    assert not bundle.exists()
    err = assert_error(lab.api.post("/api/v1/models/tiny/predict", json={"inputs": ["CCO"]}), 404, "not_found")
    assert "'tiny'" in err["message"]
    # The worker never serves the erased weights from memory: the entry is dropped on its next call.
    with pytest.raises(FileNotFoundError):
        model_cache.get_predictor(bundle, settings.model_cache_size)
    assert not model_cache.cached(bundle)


# -- races and failures ----------------------------------------------------------------------


def test_a_submit_finding_its_dataset_erased_after_the_check_is_refused(
    app, lab: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the losing side of the race sees (the interleaving itself runs on PostgreSQL in
    tests/integration/test_erasure_pg.py): the kind's check read the dataset, then it was
    erased; the lock taken after the job's insert finds it gone and nothing is stored."""
    ds = lab.upload()
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    train = KINDS["train"]
    assert train.check is not None

    def check_then_erase(spec: dict, ctx: Any) -> dict:
        checked = train.check(spec, ctx)  # type: ignore[misc]
        with db.sessionmaker() as meanwhile:  # another request erases it meanwhile
            datasets_store.delete(meanwhile, settings, lab.id, ds["id"])
        return checked

    monkeypatch.setitem(KINDS, "train", dataclasses.replace(train, check=check_then_erase))
    r = lab.api.post("/api/v1/jobs", json={"kind": "train", "spec": train_spec(ds["id"])})
    err = assert_error(r, 422, "deleted")
    assert err["details"] == {"spec": {"dataset_id": [err["message"]]}}
    assert count(app, Job) == 0 and count(app, Dataset) == 0


def test_lock_references_refuses_erased_or_foreign_objects(app, lab: Tenant, other: Tenant) -> None:
    ds = other.upload()
    with app.extensions["medmaas.db"].session() as s:
        jobs_store.lock_references(s, other.id, {"dataset_id": ds["id"]})
        with pytest.raises(SpecError) as refused:
            jobs_store.lock_references(s, lab.id, {"library_id": ds["id"]})
        assert refused.value.code == "deleted" and "library_id" in refused.value.details["spec"]
        with pytest.raises(SpecError):
            jobs_store.lock_references(s, other.id, {"model_version_id": 12345, "model": "ghost@1"})


def test_a_failed_file_removal_is_logged_not_a_500_and_the_files_are_out_of_reach(
    app, lab: Tenant, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = lab.upload()
    directory = dataset_dir(ds["id"], app)

    def refuse(path: Any, *a: Any, **k: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with caplog.at_level(logging.ERROR, logger="app.stores.erasure"):
        assert lab.delete(f"/api/v1/datasets/{ds['id']}").status_code == 204
    assert "could not remove" in caplog.text
    assert count(app, Dataset) == 0 and not directory.exists()  # moved into the tenant's trash
    leftover = lab.store.root / f"tenant-{lab.id}" / erasure.TRASH
    assert files_under(leftover)
    monkeypatch.undo()
    old = time.time() - erasure.TRASH_SWEEP_AGE_S - 60
    for entry in leftover.iterdir():
        os.utime(entry, (old, old))
    lab.add_version("sol", 1)
    assert lab.delete("/api/v1/models/sol").status_code == 204  # the next erasure sweeps it
    assert files_under(leftover) == []


def test_when_the_trash_cannot_take_a_directory_it_is_removed_in_place(
    app, lab: Tenant, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = lab.upload()
    directory = dataset_dir(ds["id"], app)

    def refuse(*_a: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", refuse)
    with caplog.at_level(logging.ERROR, logger="app.stores.erasure"):
        assert lab.delete(f"/api/v1/datasets/{ds['id']}").status_code == 204
    assert "could not move" in caplog.text
    assert count(app, Dataset) == 0
    assert not directory.exists()


def test_a_failed_commit_keeps_the_row_and_puts_the_files_back(app, lab: Tenant) -> None:
    ds = lab.upload()
    directory = dataset_dir(ds["id"], app)
    before = files_under(directory)
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    with db.sessionmaker() as s:

        def fail() -> None:
            raise RuntimeError("connection lost at commit")

        s.commit = fail  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            datasets_store.delete(s, settings, lab.id, ds["id"])
    assert files_under(directory) == before and count(app, Dataset) == 1
    assert lab.api.get(f"/api/v1/datasets/{ds['id']}").status_code == 200


# -- web pages -------------------------------------------------------------------------------


def sign_in(app, secret: str):
    browser = app.test_client()
    browser.get("/login")
    with browser.session_transaction() as sess:
        csrf = sess["csrf"]
    r = browser.post("/login", data={"api_key": secret, "csrf_token": csrf})
    assert r.status_code == 302, r.get_data(as_text=True)
    with browser.session_transaction() as sess:
        return browser, sess["csrf"]


def test_pages_confirm_then_delete_with_csrf_for_members_only(app, lab: Tenant) -> None:
    ds = lab.upload()
    bundle = lab.add_version("sol", 1)
    lab.add_version("sol", 2)
    job = lab.api.submit("sleep", {"seconds": 0})

    viewer, viewer_csrf = sign_in(app, lab.viewer_secret)
    page = viewer.get(f"/datasets/{ds['id']}").get_data(as_text=True)
    assert "Delete dataset" not in page and "delete-link" not in page
    assert 'id="delete-v1"' not in viewer.get("/models/sol").get_data(as_text=True)
    assert viewer.get(f"/datasets/{ds['id']}/delete").status_code == 403
    assert viewer.post(f"/datasets/{ds['id']}/delete", data={"csrf_token": viewer_csrf}).status_code == 403
    assert count(app, Dataset) == 1

    member, csrf = sign_in(app, lab.member_secret)
    page = member.get(f"/datasets/{ds['id']}").get_data(as_text=True)
    assert f'href="/datasets/{ds["id"]}/delete"' in page
    confirm = member.get(f"/datasets/{ds['id']}/delete").get_data(as_text=True)
    assert "Delete dataset" in confirm and 'id="delete-confirm-form"' in confirm and "csrf_token" in confirm
    assert member.post(f"/datasets/{ds['id']}/delete").status_code == 400  # no CSRF token
    assert count(app, Dataset) == 1
    r = member.post(f"/datasets/{ds['id']}/delete", data={"csrf_token": csrf})
    assert r.status_code == 302 and urlsplit(r.headers["Location"]).path == "/datasets"
    assert count(app, Dataset) == 0

    assert 'id="delete-v1"' in member.get("/models/sol").get_data(as_text=True)
    r = member.post("/models/sol/versions/1/delete", data={"csrf_token": csrf})
    assert urlsplit(r.headers["Location"]).path == "/models/sol" and not bundle.exists()
    r = member.post("/models/sol/delete", data={"csrf_token": csrf})
    assert urlsplit(r.headers["Location"]).path == "/models" and count(app, ModelVersion) == 0

    # A job still queued: the page names it instead of offering the button; the POST is refused.
    confirm = member.get(f"/jobs/{job['id']}/delete").get_data(as_text=True)
    assert "cancel it first" in confirm and 'id="delete-confirm-form"' not in confirm
    r = member.post(f"/jobs/{job['id']}/delete", data={"csrf_token": csrf}, follow_redirects=True)
    assert "cancel it first" in r.get_data(as_text=True) and count(app, Job) == 1
    lab.api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert 'id="delete-link"' in member.get(f"/jobs/{job['id']}").get_data(as_text=True)
    r = member.post(f"/jobs/{job['id']}/delete", data={"csrf_token": csrf})
    assert urlsplit(r.headers["Location"]).path == "/jobs" and count(app, Job) == 0


def test_the_dataset_confirmation_names_the_jobs_using_it(app, lab: Tenant) -> None:
    ds = lab.upload()
    job = lab.api.submit("train", train_spec(ds["id"]))
    member, csrf = sign_in(app, lab.member_secret)
    confirm = member.get(f"/datasets/{ds['id']}/delete").get_data(as_text=True)
    assert f'href="/jobs/{job["id"]}"' in confirm and 'id="delete-confirm-form"' not in confirm
    r = member.post(f"/datasets/{ds['id']}/delete", data={"csrf_token": csrf}, follow_redirects=True)
    assert f"job(s) {job['id']}" in r.get_data(as_text=True) and count(app, Dataset) == 1


# -- the command-line client ---------------------------------------------------------------


class FlaskSession(requests.Session):
    """A requests session that hands each request to the app's test client (no sockets)."""

    def __init__(self, client) -> None:
        super().__init__()
        self.flask = client

    def request(
        self,
        method: str,
        url: str,
        params: Any = None,
        json: Any = None,
        headers: Any = None,  # type: ignore[override]
        **_kw: Any,
    ) -> requests.Response:
        parts = urlsplit(url)
        got = self.flask.open(
            parts.path, method=method, query_string=params, json=json, headers={**self.headers, **(headers or {})}
        )
        resp = requests.Response()
        resp.status_code, resp.url, resp._content = got.status_code, url, got.get_data()
        resp.headers.update(dict(got.headers))
        return resp


def run_cli(client, secret: str, monkeypatch: pytest.MonkeyPatch, *args: str, input: str | None = None):
    monkeypatch.setattr(
        commands, "get_client", lambda: Client("http://medmaas.test", secret, session=FlaskSession(client))
    )
    return CliRunner().invoke(commands.client, list(args), input=input, catch_exceptions=False)


def test_cli_deletes_after_confirmation_or_with_yes(app, client, lab: Tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = lab.upload()
    lab.add_version("sol", 1)
    lab.add_version("sol", 2)
    job = lab.api.submit("sleep", {"seconds": 0})

    r = run_cli(client, lab.member_secret, monkeypatch, "datasets", "delete", str(ds["id"]), input="n\n")
    assert r.exit_code == 1 and "Aborted" in r.output and count(app, Dataset) == 1
    r = run_cli(client, lab.member_secret, monkeypatch, "datasets", "delete", str(ds["id"]), input="y\n")
    assert r.exit_code == 0 and f"Deleted dataset {ds['id']}" in r.output and count(app, Dataset) == 0

    r = run_cli(client, lab.member_secret, monkeypatch, "models", "delete", "sol", "--version", "2", "--yes")
    assert r.exit_code == 0 and "Deleted sol version 2" in r.output
    assert count(app, ModelVersion) == 1

    r = run_cli(client, lab.member_secret, monkeypatch, "jobs", "delete", str(job["id"]), "--yes")
    assert r.exit_code == 3 and "cancel it first" in r.output and "409 job_active" in r.output
    lab.api.post(f"/api/v1/jobs/{job['id']}/cancel")
    r = run_cli(client, lab.member_secret, monkeypatch, "jobs", "delete", str(job["id"]), "--yes")
    assert r.exit_code == 0 and count(app, Job) == 0

    r = run_cli(client, lab.viewer_secret, monkeypatch, "models", "delete", "sol", "--yes")
    assert r.exit_code == 3 and "403 forbidden" in r.output and count(app, ModelVersion) == 1
    r = run_cli(client, lab.member_secret, monkeypatch, "models", "delete", "sol", "--yes")
    assert r.exit_code == 0 and "Deleted model sol" in r.output and count(app, ModelVersion) == 0
