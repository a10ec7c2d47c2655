"""The whole job path on both artifact stores: the local directory (file://, plaintext) and an
S3 bucket (MEDMAAS_ARTIFACT_STORE=s3://..., encryption at rest on) on moto's real HTTP S3
server on loopback, with PostgreSQL, Redis and worker subprocesses. On s3 each worker is a
"host" with its own empty artifact directory (its cache): nothing is shared but the services.

Upload on the web host, train on host A, SIGKILL A mid-training and finish on host B (which
resumes from the checkpoint A left in the store), score a library on hosts B and C, download
the result on the web host (on s3 streamed from the bucket: the web host never had the file),
then erase the job and the datasets: their files leave the store. On s3 every object the
bucket held is ciphertext."""

from __future__ import annotations

import csv
import gzip
import io
import signal
from pathlib import Path

import pytest
from safetensors.numpy import load as load_safetensors
from sqlalchemy import select

from app import artifacts
from app.config import Settings
from app.crypto import HEADER_SIZE, is_encrypted, new_master_key
from app.models import ModelVersion
from app.sample_data import moses_library, solubility_csv
from tests.conftest import ApiClient, _make_app, close_app, create_tenant_key, wait_until
from tests.s3 import make_bucket, objects, s3_endpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

LIBRARY_ROWS = 3_000


@pytest.fixture(params=["file", "s3"])
def deployment(request, pg_settings, tmp_path: Path):
    """(api of a fresh tenant, settings of the web host, the store's files, tenant id)."""
    settings = pg_settings.replace(home=tmp_path / "web", artifact_root="", score_shard_rows=1_000)
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        url = f"s3://{make_bucket(endpoint)}/artifacts"
        settings = settings.replace(artifact_store=url, s3_endpoint_url=endpoint, encryption_key=new_master_key())

        def stored() -> dict[str, bytes]:
            return objects(endpoint, url)
    else:

        def stored() -> dict[str, bytes]:
            root = settings.artifacts
            return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    app = _make_app(settings)
    tenant, key = create_tenant_key(app)
    yield ApiClient(app.test_client(), key), settings, stored, tenant
    close_app(app)
    artifacts.configure(settings.replace(artifact_store="", encryption_key=""))


def host_env(settings: Settings, tmp_path: Path, name: str) -> dict[str, str] | None:
    """A worker host on s3: its own home and artifact directory (empty), nothing shared but
    the services. On file:// the hosts share the directory (as on one machine or NFS)."""
    if not settings.artifact_store:
        return None
    home = tmp_path / name
    return {"MEDMAAS_HOME": str(home), "MEDMAAS_ARTIFACT_ROOT": str(home / "artifacts")}


def upload(api: ApiClient, path: Path, kind: str, **options: str) -> dict:
    with open(path, "rb") as fh:
        r = api.post(
            "/api/v1/datasets",
            data={"kind": kind, "file": (fh, path.name), **options},
            content_type="multipart/form-data",
        )
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def test_upload_train_resume_score_download_erase(deployment, processes, tmp_path) -> None:
    api, settings, stored_files, tenant = deployment
    on_s3 = bool(settings.artifact_store)
    web_root = settings.artifacts
    # -- upload: the store of record has it, rows name its URLs
    solubility = upload(api, solubility_csv(tmp_path / "solubility.csv"), "sequences", label_columns="solubility")
    stored = stored_files()
    names = {k.rsplit("/", 1)[-1] for k in stored if k.startswith(f"tenant-{tenant}/datasets/")}
    assert {"upload-solubility.csv", "data.parquet"} <= names, sorted(stored)

    # -- train on host A, SIGKILL it after two epochs, finish on host B
    procs = processes(settings)
    procs.beat()
    host_a = procs.worker("cpu,gpu", env=host_env(settings, tmp_path, "host-a"))
    epochs = 5
    job = api.submit(
        "train",
        {
            "model_name": "sol",
            "dataset_id": solubility["id"],
            "arch": "rnn",
            "task": "regression",
            "target": "solubility",
            "epochs": epochs,
            "batch_size": 32,
            "lr": 3e-3,
            "seed": 1,
            "model": {"cell": "gru", "embedding_dim": 32, "hidden_size": 64},
        },
    )

    def epochs_seen() -> list[int]:
        return [e["data"]["epoch"] for e in api.events(job["id"]) if e["type"] == "metric"]

    wait_until(lambda: len(epochs_seen()) >= 2, 300, what="two epochs on host A")
    procs.kill(host_a, signal.SIGKILL)
    assert f"tenant-{tenant}/jobs/{job['id']}/checkpoint.pt" in stored_files()
    procs.worker("cpu,gpu", env=host_env(settings, tmp_path, "host-b"))
    done = api.wait(job["id"], timeout=600)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    # 2; one more if the loaded test machine starved host B past the tests' 4 s heartbeat timeout
    assert done["attempts"] >= 2
    assert done["result"]["epochs_trained"] == epochs
    events = api.events(job["id"])
    second_start = [e["seq"] for e in events if e["type"] == "state" and e["data"]["to"] == "running"][1]
    second_run = [e["data"]["epoch"] for e in events if e["type"] == "metric" and e["seq"] > second_start]
    assert second_run
    assert second_run[0] > 1, "host B must continue from the checkpoint host A left in the bucket"
    db = api.client.application.extensions["medmaas.db"]
    with db.session() as s:
        bundle_uri = s.scalar(select(ModelVersion.artifact_uri).where(ModelVersion.tenant_id == tenant))
    scheme = settings.artifact_store if on_s3 else web_root.resolve().as_uri()
    assert bundle_uri.startswith(f"{scheme}/tenant-{tenant}/models/sol/")
    assert api.put("/api/v1/models/sol/aliases/production", json={"version": 1}).status_code == 200
    weights = api.get("/api/v1/models/sol/versions/1/files/weights")
    assert weights.status_code == 200, weights.get_json()
    assert load_safetensors(weights.data)  # decrypted on the way out of the bucket

    # -- score a gzip library on hosts B and C (its decompressed copy and the shards' parts go through the store)
    lib_path = tmp_path / "lib.smi.gz"
    with gzip.open(moses_library(), "rt") as src, gzip.open(lib_path, "wt") as dst:
        next(src)
        for i in range(LIBRARY_ROWS):
            dst.write(f"{next(src).strip()} m{i}\n")
    library = upload(api, lib_path, "library")
    procs.worker("cpu", env=host_env(settings, tmp_path, "host-c"))
    job = api.submit("score", {"model": "sol@production", "library_id": library["id"], "output": "csv"})
    done = api.wait(job["id"], timeout=300)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    assert done["result"]["rows"] == LIBRARY_ROWS
    assert done["result"]["shards"]["count"] == 3
    job_prefix = f"tenant-{tenant}/jobs/{job['id']}/"
    assert job_prefix + "scores.csv" in stored_files()
    wait_until(
        lambda: not [k for k in stored_files() if k.startswith(job_prefix + "scratch/")],
        30,
        what="the scratch (parts, decompressed library) to go once the success is committed",
    )

    # -- download on the web host: on s3 streamed from the bucket, decrypted
    assert (web_root / job_prefix / "scores.csv").exists() is not on_s3
    r = api.get(f"/api/v1/jobs/{job['id']}/result")
    assert r.status_code == 200
    table = list(csv.DictReader(io.StringIO(r.data.decode())))
    assert [int(t["row"]) for t in table] == list(range(LIBRARY_ROWS))
    assert table[0]["id"] == "m0"
    assert (web_root / job_prefix / "scores.csv").exists() is not on_s3, "on s3 the web host serves from the bucket"
    r = api.get(f"/api/v1/jobs/{job['id']}/result?format=parquet")
    assert r.status_code == 200
    assert r.data[:4] == b"PAR1"

    # -- at rest on s3 (encryption on): every object is ciphertext
    if on_s3:
        plain = [k for k, v in stored_files().items() if not is_encrypted(v[:HEADER_SIZE])]
        assert not plain, plain

    # -- erasure reaches the bucket
    assert api.client.delete(f"/api/v1/jobs/{job['id']}", headers=api.headers).status_code == 204
    for ds in (library, solubility):
        assert api.client.delete(f"/api/v1/datasets/{ds['id']}", headers=api.headers).status_code == 204
    stored = stored_files()
    assert not [k for k in stored if k.startswith(job_prefix)]
    assert not [k for k in stored if k.startswith(f"tenant-{tenant}/datasets/")]
    assert not [k for k in stored if "/trash/" in k], "trash markers are removed after the commit"
