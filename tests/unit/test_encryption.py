"""Encryption at rest (MEDMAAS_ENCRYPTION_KEY): the segmented AES-GCM format, the per-tenant
data keys and master-key rotation, and the artifact store's open_read / open_write."""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
from pathlib import Path

import pytest

from app import artifacts, auth
from app.artifacts import ArtifactStore, open_read, open_write
from app.config import from_env
from app.crypto import (
    HEADER_SIZE,
    TAG,
    DecryptionError,
    EncryptedReader,
    EncryptedWriter,
    key_fingerprint,
    new_master_key,
    parse_master_key,
)
from app.db import Database
from app.models import TenantDataKey
from app.stores import data_keys
from tests.conftest import use_template

SEG = 1 << 16
KEY = os.urandom(32)


def seal(plain: bytes, binding: bytes = b"tenant-1/f", chunks: int = 7777) -> bytes:
    sink = io.BytesIO()
    sink.close = lambda: None  # keep the bytes readable after the writer closes its sink
    w = EncryptedWriter(sink, KEY, 1, 1, binding)
    for i in range(0, len(plain), chunks):
        assert w.write(plain[i : i + chunks]) == len(plain[i : i + chunks])
    assert w.tell() == len(plain)
    w.close()
    return sink.getvalue()


def reader(blob: bytes, binding: bytes = b"tenant-1/f", key: bytes = KEY) -> io.BufferedReader:
    return io.BufferedReader(EncryptedReader(io.BytesIO(blob), lambda h: key, binding), SEG)


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 3 * SEG + 12345])
def test_round_trip_at_segment_edges(size: int) -> None:
    plain = os.urandom(size)
    blob = seal(plain)
    assert plain[:64] not in blob if size >= 64 else True
    n_segments = max(1, -(-size // SEG))
    assert len(blob) == HEADER_SIZE + size + n_segments * TAG
    with reader(blob) as f:
        assert f.read() == plain
        assert f.seek(0, io.SEEK_END) == size


def test_seek_and_read_at_random_offsets_equal_the_plaintext() -> None:
    plain = os.urandom(5 * SEG + 999)
    f = reader(seal(plain))
    rnd = random.Random(7)
    for _ in range(300):
        off, n = rnd.randrange(len(plain) + 10), rnd.choice([1, 7, 100, SEG - 1, SEG, 2 * SEG + 3])
        f.seek(off)
        assert f.read(n) == plain[off : off + n]
        assert f.tell() == min(off + n, len(plain)) if off <= len(plain) else True
    f.seek(-10, io.SEEK_END)
    assert f.read() == plain[-10:]


def segment_bounds(blob: bytes, i: int) -> slice:
    start = HEADER_SIZE + i * (SEG + TAG)
    return slice(start, start + SEG + TAG)


def test_tampering_is_detected() -> None:
    blob = bytearray(seal(os.urandom(3 * SEG)))
    blob[segment_bounds(blob, 1).start + 5] ^= 1
    f = reader(bytes(blob))
    assert len(f.read(SEG)) == SEG  # segment 0 is intact
    with pytest.raises(DecryptionError, match="segment 1"):
        f.read(10)


def test_header_tampering_is_detected() -> None:
    blob = bytearray(seal(os.urandom(1000)))
    blob[20] ^= 1  # inside the salt
    with pytest.raises(DecryptionError):
        reader(bytes(blob))


@pytest.mark.parametrize("cut", [TAG + SEG, 1, 5])
def test_truncation_is_detected_at_open(cut: int) -> None:
    blob = seal(os.urandom(3 * SEG))
    with pytest.raises(DecryptionError):
        reader(blob[:-cut])  # a whole last segment, or part of one


def test_reordered_segments_are_detected() -> None:
    blob = seal(os.urandom(3 * SEG + 10))
    s0, s1 = segment_bounds(blob, 0), segment_bounds(blob, 1)
    swapped = blob[: s0.start] + blob[s1] + blob[s0] + blob[s1.stop :]
    f = reader(swapped)
    with pytest.raises(DecryptionError):
        f.read(10)


def test_wrong_key_or_another_file_binding_is_refused() -> None:
    blob = seal(b"x" * 100)
    with pytest.raises(DecryptionError):
        reader(blob, key=os.urandom(32))
    with pytest.raises(DecryptionError):
        reader(blob, binding=b"tenant-1/other")  # moved or copied to another path


# -- the artifact store and data keys ---------------------------------------------------------


@pytest.fixture()
def encrypted(tmp_path: Path, sqlite_template: Path):  # noqa: ANN201
    """(settings with a master key, db, tenant id, store)."""
    settings = from_env({}, home=tmp_path / "home", encryption_key=new_master_key())
    use_template(settings, sqlite_template)
    db = Database(settings.sqlalchemy_url)
    with db.session() as s:
        tenant = auth.create_tenant(s, "lab").id
    store = ArtifactStore.from_settings(settings)
    yield settings, db, tenant, store
    artifacts.configure(settings.replace(encryption_key=""))
    db.dispose()


def test_malformed_master_key_stops_startup() -> None:
    with pytest.raises(ValueError, match="base64"):
        from_env({"MEDMAAS_ENCRYPTION_KEY": "not base64!"})
    with pytest.raises(ValueError, match="32 bytes"):
        from_env({"MEDMAAS_ENCRYPTION_KEY": "c2hvcnQ="})


def test_store_files_are_ciphertext_and_read_back(encrypted) -> None:  # noqa: ANN001
    settings, db, tenant, store = encrypted
    path = store.tenant_dir(tenant, "datasets", "x") / "data.csv"
    plain = b"smiles,label\nCCO,1\n" * 10_000
    with open_write(path) as f:
        f.write(plain)
    raw = path.read_bytes()
    assert b"CCO" not in raw and raw.startswith(b"MMAE")
    assert [p.name for p in path.parent.iterdir()] == ["data.csv"]  # no temporary left
    with open_read(path) as f:
        f.seek(100_000)
        assert f.read(50) == plain[100_000:100_050]
    assert artifacts.plaintext_size(path) == len(plain)
    with db.session() as s:
        row = s.query(TenantDataKey).filter_by(tenant_id=tenant).one()
        assert len(row.wrapped_key) == 12 + 32 + 16  # nonce, key, tag: never the raw key


def test_a_failed_write_leaves_nothing(encrypted) -> None:  # noqa: ANN001
    _, _, tenant, store = encrypted
    path = store.tenant_dir(tenant, "jobs", "1") / "part.parquet"
    with pytest.raises(RuntimeError), open_write(path) as f:
        f.write(b"half")
        raise RuntimeError("crash")
    assert list(path.parent.iterdir()) == []


def test_another_tenants_file_does_not_open(encrypted) -> None:  # noqa: ANN001
    settings, db, tenant, store = encrypted
    with db.session() as s:
        other = auth.create_tenant(s, "other").id
    mine = store.tenant_dir(tenant, "datasets", "x") / "data.bin"
    with open_write(mine) as f:
        f.write(b"secret rows")
    theirs = store.tenant_dir(other, "datasets", "x") / "data.bin"
    theirs.write_bytes(mine.read_bytes())  # copied by hand into the other tenant's tree
    with pytest.raises(DecryptionError, match="tenant"):
        open_read(theirs)


def test_without_the_key_files_are_refused(encrypted) -> None:  # noqa: ANN001
    settings, _, tenant, store = encrypted
    path = store.tenant_dir(tenant, "models", "m") / "config.json"
    with open_write(path) as f:
        f.write(b"{}")
    artifacts.configure(settings.replace(encryption_key=""))
    with pytest.raises(DecryptionError, match="MEDMAAS_ENCRYPTION_KEY"):
        open_read(path)
    artifacts.configure(settings.replace(encryption_key=new_master_key()))  # the wrong master key
    with pytest.raises(DecryptionError, match="wrapped by master key"):
        open_read(path)


def test_rotation_rewraps_every_data_key_and_data_still_reads(encrypted) -> None:  # noqa: ANN001
    settings, db, tenant, store = encrypted
    with db.session() as s:
        other = auth.create_tenant(s, "other").id
    files = {}
    for t in (tenant, other):
        files[t] = store.tenant_dir(t, "datasets", "x") / "data.bin"
        with open_write(files[t]) as f:
            f.write(f"rows of {t}".encode() * 1000)
    old = parse_master_key(settings.encryption_key)
    new_text = new_master_key()
    new = parse_master_key(new_text)
    with db.session() as s:
        before = {r.tenant_id: r.wrapped_key for r in s.query(TenantDataKey)}
        assert data_keys.rotate_master(s, old, new) == 2
    with db.session() as s:
        rows = {r.tenant_id: r for r in s.query(TenantDataKey)}
        assert all(rows[t].wrapped_key != before[t] for t in rows)
        assert data_keys.master_key_counts(s) == {key_fingerprint(new): 2}
        assert data_keys.rotate_master(s, old, new) == 0  # a rerun changes nothing
    rotated = settings.replace(encryption_key=new_text)
    artifacts.configure(rotated)  # a process started with the new key
    for t, path in files.items():
        with open_read(path) as f:
            assert f.read() == f"rows of {t}".encode() * 1000
    artifacts.configure(settings)  # the old key no longer opens anything
    with pytest.raises(DecryptionError, match="wrapped by master key"):
        open_read(files[tenant])


def test_header_names_its_data_key(encrypted) -> None:  # noqa: ANN001
    _, db, tenant, store = encrypted
    path = store.tenant_dir(tenant, "d") / "f"
    with open_write(path) as f:
        f.write(b"abc")
    magic, version, log2, _, t, key_id = struct.unpack(">4sBBHQQ", path.read_bytes()[:24])
    with db.session() as s:
        assert (t, key_id) == (tenant, s.query(TenantDataKey).filter_by(tenant_id=tenant).one().id)
    assert (magic, version, log2) == (b"MMAE", 1, 16)


# -- the command line ---------------------------------------------------------------------------


def test_cli_rotates_the_master_key(encrypted) -> None:  # noqa: ANN001
    from click.testing import CliRunner

    from medmaas.cli import main

    settings, db, tenant, store = encrypted
    path = store.tenant_dir(tenant, "datasets", "x") / "data.bin"
    with open_write(path) as f:
        f.write(b"patient rows")
    new = new_master_key()
    env = {"MEDMAAS_HOME": str(settings.home), "MEDMAAS_ENCRYPTION_KEY": settings.encryption_key, "NEW_KEY": new}
    cli = CliRunner()
    assert cli.invoke(main, ["encryption", "status"], env=env).exit_code == 0
    out = cli.invoke(main, ["encryption", "rotate-master", "--new-key-env", "NEW_KEY"], env=env)
    assert out.exit_code == 0, out.output
    assert f"re-wrapped 1 tenant data key(s) with master key {key_fingerprint(parse_master_key(new))}" in out.output
    stale = cli.invoke(main, ["encryption", "status"], env=env)  # the old key no longer wraps anything
    assert stale.exit_code == 1 and "(current)" not in stale.output
    assert cli.invoke(main, ["encryption", "status"], env={**env, "MEDMAAS_ENCRYPTION_KEY": new}).exit_code == 0
    artifacts.configure(settings.replace(encryption_key=new))
    with open_read(path) as f:
        assert f.read() == b"patient rows"
    bad = cli.invoke(main, ["encryption", "status"], env={**env, "MEDMAAS_ENCRYPTION_KEY": "c2hvcnQ="})
    assert bad.exit_code == 1 and "must be base64 of 32 bytes" in bad.output
    missing = cli.invoke(main, ["encryption", "rotate-master", "--new-key-env", "UNSET_VAR"], env=env)
    assert missing.exit_code == 1 and "$UNSET_VAR is not set" in missing.output


# -- end to end: nothing readable under the artifact root ---------------------------------------


@pytest.fixture()
def encrypted_app(sqlite_settings):  # noqa: ANN001, ANN201
    from app import create_app
    from tests.conftest import close_app

    settings = sqlite_settings.replace(encryption_key=new_master_key())
    app = create_app(settings)
    yield app
    close_app(app)
    artifacts.configure(settings.replace(encryption_key=""))


def moses_smiles(n: int) -> list[str]:
    from app.sample_data import moses_library

    with gzip.open(moses_library(), "rt") as fh:
        next(fh)
        return [next(fh).split(",")[0].strip() for _ in range(n)]


def npz_bytes() -> bytes:
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    images = (rng.integers(0, 60, (60, 12, 12)) + labels[:, None, None] * 150).astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, train_images=images, train_labels=labels)
    return buf.getvalue()


def run(app, job_id: int) -> None:  # noqa: ANN001
    from workers.tasks import execute_job

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    assert execute_job(db, settings, None, job_id) == "succeeded"


def test_uploads_training_predictions_and_scores_leave_no_plaintext_on_disk(encrypted_app) -> None:  # noqa: ANN001
    from tests.conftest import ApiClient, create_tenant_key
    from tests.unit.test_api_datasets_models import upload

    app = encrypted_app
    settings = app.extensions["medmaas.settings"]
    api = ApiClient(app.test_client(), create_tenant_key(app)[1])
    smiles = moses_smiles(300)
    train_csv = b"smiles,logp\n" + b"".join(f"{s},{len(s) / 10:.2f}\n".encode() for s in smiles[:200])
    seqs = upload(api, "sequences", "mols.csv", train_csv, label_columns="logp")
    images = upload(api, "images", "pics.npz", npz_bytes())
    smi = "".join(f"{s} m{i}\n" for i, s in enumerate(smiles[200:])).encode()
    library = upload(api, "library", "lib.smi.gz", gzip.compress(smi))  # scoring decompresses it once, encrypted
    assert (seqs.status_code, images.status_code, library.status_code) == (201, 201, 201), library.get_json()

    rnn = api.submit(
        "train",
        {
            "model_name": "mols",
            "dataset_id": seqs.get_json()["id"],
            "arch": "rnn",
            "task": "regression",
            "target": "logp",
            "epochs": 2,
            "model": {"hidden_size": 16, "embedding_dim": 8},
        },
    )
    run(app, rnn["id"])
    cnn = api.submit(
        "train",
        {
            "model_name": "pics",
            "dataset_id": images.get_json()["id"],
            "arch": "cnn",
            "task": "classification",
            "epochs": 1,
            "model": {"channels": [4], "hidden": 8},
        },
    )
    run(app, cnn["id"])
    predict = api.post("/api/v1/models/mols/predict", json={"inputs": smiles[:3], "version": 1, "timeout": 0})
    assert predict.status_code == 202
    run(app, predict.get_json()["id"])
    predictions = api.get(f"/api/v1/jobs/{predict.get_json()['id']}/result").get_json()["predictions"]
    assert [p["input"] for p in predictions] == smiles[:3] and all("error" not in p for p in predictions), predictions
    score = api.submit(
        "score", {"model": "mols@1", "library_id": library.get_json()["id"], "top_k": 5, "output": "csv"}
    )
    run(app, score["id"])

    # what users download is the plaintext
    scores = api.get(f"/api/v1/jobs/{score['id']}/result?format=csv").data.decode()
    assert smiles[200] in scores and scores.count("\n") == 101
    assert api.get(f"/api/v1/jobs/{score['id']}/result?format=parquet").data.startswith(b"PAR1")
    weights = api.get("/api/v1/models/mols/versions/1/files/weights").data
    header = weights[8 : 8 + struct.unpack("<Q", weights[:8])[0]]
    assert b'"dtype"' in header
    assert b'"format_version"' in api.get("/api/v1/models/pics/versions/1/files/config").data

    # ... and what lies on disk is not
    needles = {s.encode() for s in smiles if len(s) >= 12} | {
        b"smiles,logp",  # the CSV header
        b"PK\x03\x04",  # zip / npz
        b"PAR1",  # parquet
        b"\x93NUMPY",  # .npy inside npz
        b'"dtype"',  # safetensors JSON header
        b"__metadata__",
        b'"format_version"',  # config.json
        b'"vocab"',
    }
    files = sorted(p for p in settings.artifacts.rglob("*") if p.is_file())
    kinds = {p.suffix for p in files}
    assert {".csv", ".npz", ".parquet", ".safetensors", ".json", ".gz", ".pt"} <= kinds, kinds
    hits = [(str(p.relative_to(settings.artifacts)), n) for p in files for n in needles if n in p.read_bytes()]
    print(
        f"\nencryption at rest: scanned {len(files)} files ({sum(p.stat().st_size for p in files)} bytes) "
        f"for {len(needles)} plaintext markers: {len(hits)} hits; files: "
        + ", ".join(str(p.relative_to(settings.artifacts)) for p in files)
    )
    assert hits == []
    assert all(p.read_bytes().startswith(b"MMAE") for p in files)
