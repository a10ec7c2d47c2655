"""The artifact store on an S3 endpoint (MEDMAAS_ARTIFACT_STORE=s3://..., app/storage.py),
against moto's real HTTP S3 server on loopback. Two local roots stand for two hosts that share
nothing but the bucket: what one writes the other reads, a rewrite by one is seen by the
other (ETags, not the local copy, decide), and existence, listings and deletion ask the store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flask import Flask

from app import artifacts, auth
from app.artifacts import ArtifactStore, open_read, open_write, send_artifact
from app.config import Settings, from_env
from app.crypto import HEADER_SIZE, is_encrypted, new_master_key
from app.db import Database
from app.storage import CACHE_META, parse_store_url
from app.stores import erasure
from tests.conftest import use_template
from tests.s3 import client, make_bucket, objects, s3_endpoint, s3_settings, s3_store  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def host(tmp_path: Path, name: str, store_url: str, endpoint: str, **overrides: object) -> Settings:
    """Settings of one host: its own empty home and artifact root, the shared bucket."""
    settings = from_env({}, home=tmp_path / name, **overrides)
    settings = s3_settings(settings, store_url, endpoint)
    artifacts.configure(settings)
    return settings


@pytest.fixture
def two_hosts(tmp_path: Path, s3_store: str, s3_endpoint: str):  # noqa: F811
    a = host(tmp_path, "a", s3_store, s3_endpoint)
    b = host(tmp_path, "b", s3_store, s3_endpoint)
    yield ArtifactStore.from_settings(a), ArtifactStore.from_settings(b), s3_store
    for s in (a, b):
        artifacts.configure(s.replace(artifact_store=""))


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_write(path) as fh:
        fh.write(data)


def test_store_url_is_validated() -> None:
    assert parse_store_url("") is None
    assert parse_store_url("file://") is None
    assert parse_store_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    with pytest.raises(ValueError, match="MEDMAAS_ARTIFACT_STORE"):
        from_env({"MEDMAAS_ARTIFACT_STORE": "gs://bucket/x"})
    with pytest.raises(ValueError, match="MEDMAAS_ARTIFACT_STORE"):
        from_env({"MEDMAAS_ARTIFACT_STORE": "s3:///nobucket"})


def test_written_on_one_host_read_on_another(two_hosts, s3_endpoint: str) -> None:  # noqa: F811
    a, b, url = two_hosts
    path_a = a.tenant_dir(1, "datasets", "d1") / "upload.csv"
    write(path_a, b"smiles\nCCO\n")
    # the row's URL names the object, and maps to each host's own local path
    uri = a.url(path_a)
    assert uri == f"{url}/tenant-1/datasets/d1/upload.csv"
    path_b = b.path(uri)
    assert path_b == b.root / "tenant-1/datasets/d1/upload.csv"
    assert not path_b.exists()
    assert objects(s3_endpoint, url) == {"tenant-1/datasets/d1/upload.csv": b"smiles\nCCO\n"}
    assert artifacts.exists(path_b)
    assert artifacts.is_file(path_b)
    assert not artifacts.is_dir(path_b)
    assert artifacts.is_dir(path_b.parent)
    with open_read(path_b) as fh:
        assert fh.read() == b"smiles\nCCO\n"
    assert path_b.read_bytes() == b"smiles\nCCO\n"  # now cached on b
    with pytest.raises(ValueError, match="outside"):
        b.path("s3://another-bucket/artifacts/tenant-1/x")
    with pytest.raises(ValueError, match="unsupported"):
        b.path("gs://x/y")


def test_a_rewrite_elsewhere_is_fetched_again(two_hosts) -> None:
    """A checkpoint rewritten by the host that took over a job: same name, same size."""
    a, b, _ = two_hosts
    rel = "tenant-1/jobs/7/checkpoint.pt"
    write(a.root / rel, b"epoch-1")
    with open_read(b.root / rel) as fh:
        assert fh.read() == b"epoch-1"
    write(a.root / rel, b"epoch-2")
    with open_read(b.root / rel) as fh:
        assert fh.read() == b"epoch-2"
    # and back: b rewrites, a (whose copy is the older one it wrote) reads b's
    write(b.root / rel, b"epoch-3")
    with open_read(a.root / rel) as fh:
        assert fh.read() == b"epoch-3"
    # a local copy changed behind the cache's back is not trusted either way: the ETag decides
    (a.root / CACHE_META / rel).unlink()
    with open_read(a.root / rel) as fh:
        assert fh.read() == b"epoch-3"


def test_listings_and_existence_ask_the_store(two_hosts) -> None:
    a, b, _ = two_hosts
    parts = a.root / "tenant-1/jobs/3/scratch/parts"
    for i in range(3):
        write(parts / f"part-{i:05d}.parquet", b"x" * i)
    write(a.root / "tenant-1/jobs/3/scores.csv", b"a,b\n")
    b_parts = b.root / "tenant-1/jobs/3/scratch/parts"
    assert not b_parts.exists()
    assert [p.name for p in artifacts.listdir(b_parts)] == [f"part-{i:05d}.parquet" for i in range(3)]
    assert [p.name for p in artifacts.glob(b_parts.parent.parent, "*.csv")] == ["scores.csv"]
    assert artifacts.listdir(b.root / "tenant-1/jobs/404") == []
    assert not artifacts.exists(b.root / "tenant-1/jobs/404")
    assert artifacts.fetch_tree(b_parts) == b_parts.resolve()
    assert sorted(p.name for p in b_parts.iterdir()) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert b.remote is not None
    assert b.remote.tree_bytes(b.root / "tenant-1/jobs/3", frozenset({"scratch"})) == 4


def test_removal_reaches_every_host(two_hosts) -> None:
    a, b, _url = two_hosts
    rel = "tenant-1/models/m/abc/weights.safetensors"
    write(a.root / rel, b"weights")
    with open_read(b.root / rel) as fh:  # b has a copy now
        fh.read()
    ArtifactStore.remove(a.root / "tenant-1/models/m/abc")
    assert not artifacts.exists(b.root / rel)
    with pytest.raises(FileNotFoundError):
        open_read(b.root / rel)
    assert not (b.root / rel).exists()  # the stale copy went with it


def test_the_cache_sweep_drops_unused_and_erased_copies(two_hosts) -> None:
    a, b, _ = two_hosts
    for name in ("kept", "unused", "erased"):
        write(a.root / f"tenant-1/jobs/4/{name}.bin", name.encode())
        with open_read(b.root / f"tenant-1/jobs/4/{name}.bin") as fh:
            fh.read()
    (b.root / "tenant-1/jobs/4/local-only.txt").write_bytes(b"not a cached copy")
    meta = b.root / CACHE_META / "tenant-1/jobs/4/unused.bin"
    os.utime(meta, (meta.stat().st_atime - 7200, meta.stat().st_mtime - 7200))
    artifacts.remove(a.root / "tenant-1/jobs/4/erased.bin")  # erased through host a
    assert b.remote is not None
    assert b.remote.sweep(max_age_s=3600) == 2
    assert sorted(p.name for p in (b.root / "tenant-1/jobs/4").iterdir()) == ["kept.bin", "local-only.txt"]
    with open_read(b.root / "tenant-1/jobs/4/unused.bin") as fh:  # fetched again when used
        assert fh.read() == b"unused"


def test_a_failed_write_publishes_nothing(two_hosts, s3_endpoint: str) -> None:  # noqa: F811
    a, _, url = two_hosts
    path = a.tenant_dir(1, "jobs", "1") / "scores.parquet"
    writer = open_write(path)
    writer.write(b"half")
    writer.__exit__(RuntimeError, RuntimeError("killed"), None)  # as a `with` block left by an exception
    assert objects(s3_endpoint, url) == {}
    assert not path.exists()


def test_large_files_stream_in_parts(two_hosts, s3_endpoint: str) -> None:  # noqa: F811
    a, b, _url = two_hosts
    blob = os.urandom(11 * 1024 * 1024)
    write(a.root / "tenant-2/datasets/big/library.txt", blob)
    with open_read(b.root / "tenant-2/datasets/big/library.txt") as fh:
        fh.seek(5 * 1024 * 1024)
        assert fh.read(1000) == blob[5 * 1024 * 1024 : 5 * 1024 * 1024 + 1000]
    with artifacts.sendable(b.root / "tenant-2/datasets/big/library.txt") as fh:  # type: ignore[union-attr]
        assert fh.read() == blob


@pytest.fixture
def encrypted_hosts(tmp_path: Path, s3_store: str, s3_endpoint: str, sqlite_template: Path):  # noqa: F811
    """Two hosts on one database (their tenants' data keys) and one bucket, encryption on."""
    key = new_master_key()
    a = host(tmp_path, "a", s3_store, s3_endpoint, encryption_key=key)
    use_template(a, sqlite_template)
    b = host(tmp_path, "b", s3_store, s3_endpoint, encryption_key=key, database_url=a.sqlalchemy_url)
    db = Database(a.sqlalchemy_url)
    with db.session() as s:
        tenant = auth.create_tenant(s, "lab").id
    yield ArtifactStore.from_settings(a), ArtifactStore.from_settings(b), s3_store, tenant, b
    for s in (a, b):
        artifacts.configure(s.replace(artifact_store="", encryption_key=""))
    db.dispose()


def test_with_encryption_the_bucket_holds_ciphertext(encrypted_hosts, s3_endpoint: str) -> None:  # noqa: F811
    a, b, url, tenant, b_settings = encrypted_hosts
    plain = b"smiles,id\n" + b"c1ccccc1O,phenol\n" * 5000
    path = a.tenant_dir(tenant, "datasets", "x") / "upload.csv"
    write(path, plain)
    stored = objects(s3_endpoint, url)[f"tenant-{tenant}/datasets/x/upload.csv"]
    assert is_encrypted(stored[:HEADER_SIZE])
    assert b"phenol" not in stored
    with open_read(b.path(a.url(path))) as fh:
        assert fh.read() == plain
    # a download streams the plaintext from the store; presigning is for plaintext objects only
    app = Flask(__name__)
    with app.test_request_context():
        for presign in (False, True):
            resp = send_artifact(
                b.path(a.url(path)),
                b_settings.replace(s3_presigned_downloads=presign),
                download_name="x.csv",
                as_attachment=True,
            )
            resp.direct_passthrough = False
            assert resp.status_code == 200
            assert resp.get_data() == plain


def test_presigned_downloads_redirect_to_the_store(two_hosts, s3_endpoint: str) -> None:  # noqa: F811
    import requests

    a, b, _ = two_hosts
    path = a.tenant_dir(1, "jobs", "5") / "scores.csv"
    write(path, b"row,score\n1,0.5\n")
    settings = from_env({}, s3_presigned_downloads=True)
    app = Flask(__name__)
    with app.test_request_context():
        resp = send_artifact(b.root / "tenant-1/jobs/5/scores.csv", settings, download_name="s.csv", as_attachment=True)
        assert resp.status_code == 302
        got = requests.get(resp.headers["Location"], timeout=10)
        assert got.status_code == 200
        assert got.content == b"row,score\n1,0.5\n"
        assert "s.csv" in got.headers.get("Content-Disposition", "")
        resp = send_artifact(b.root / "tenant-1/jobs/5/scores.csv", settings.replace(s3_presigned_downloads=False))
        assert resp.status_code == 200


def test_erasure_removes_the_objects(two_hosts, s3_endpoint: str, tmp_path: Path) -> None:  # noqa: F811
    a, b, url = two_hosts
    write(a.root / "tenant-1/jobs/9/scores.csv", b"x")
    write(a.root / "tenant-1/jobs/9/scratch/parts/part-00000.parquet", b"y")
    write(a.root / "tenant-1/jobs/10/scores.csv", b"z")
    settings = host(tmp_path, "b", url, s3_endpoint)  # the web host: nothing local
    trash = erasure.Trash(settings, 1)
    trash.move(b.root / "tenant-1/jobs/9")
    trash.restore()  # the commit failed: the files stay
    assert set(objects(s3_endpoint, url)) == {
        "tenant-1/jobs/9/scores.csv",
        "tenant-1/jobs/9/scratch/parts/part-00000.parquet",
        "tenant-1/jobs/10/scores.csv",
    }
    trash = erasure.Trash(settings, 1)
    trash.move(b.root / "tenant-1/jobs/9")
    trash.purge()
    assert set(objects(s3_endpoint, url)) == {"tenant-1/jobs/10/scores.csv"}


def test_file_store_is_the_local_tree(tmp_path: Path) -> None:
    settings = from_env({}, home=tmp_path, artifact_store="file://")
    store = ArtifactStore.from_settings(settings)
    assert store.remote is None
    path = store.tenant_dir(1, "x") / "f.bin"
    write(path, b"data")
    assert store.url(path) == path.resolve().as_uri()
    assert artifacts.exists(path)
    assert artifacts.listdir(path.parent) == [path]
    assert artifacts.sendable(path) == path
    artifacts.remove(path.parent)
    assert not path.parent.exists()
