"""Shared fixtures. Integration tests use real services: a private redis-server and a
private PostgreSQL database per test session (so parallel runs never collide), and
workers as real subprocesses."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from app.config import Settings, from_env, to_env
from medmaas.standalone import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("MEDMAAS_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ARTIFACTS_DIR = ROOT / "test-artifacts"


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from medmaas.standalone import valkey_binary

    return valkey_binary()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:  # noqa: ANN001
    """A real Redis of our own (FLUSHALL in one test run cannot hurt another)."""
    port = free_port()
    work = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([_redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    wait_for_port(port, 15, proc)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@contextlib.contextmanager
def throwaway_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped on exit."""
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    with throwaway_pg_database("medmaas_test") as url:
        yield url


FAST_TIMINGS = dict(heartbeat_interval_s=0.5, heartbeat_timeout_s=4.0, reaper_interval_s=0.5, requeue_grace_s=2.0)


@pytest.fixture(scope="session")
def pg_settings(tmp_path_factory, pg_url, redis_url) -> Settings:  # noqa: ANN001
    from app.migrate import upgrade

    home = tmp_path_factory.mktemp("medmaas-pg")
    settings = from_env({}, home=home, database_url=pg_url, broker_url=redis_url, testing=True,
                        secret_key="test-secret", **FAST_TIMINGS)
    upgrade(settings)
    return settings


@pytest.fixture()
def broker_url(redis_url) -> str:  # noqa: ANN001
    """The broker for SQLite-backed settings: the real redis-server here; tests/unit/conftest.py
    overrides it with an in-memory fakeredis server."""
    return redis_url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:  # noqa: ANN001
    """A SQLite database migrated to head once per session; each test gets a copy (a file copy
    is far cheaper than running every migration again)."""
    from app.migrate import upgrade

    settings = from_env({}, home=tmp_path_factory.mktemp("sqlite-template"))
    upgrade(settings)
    path = settings.home / "medmaas.db"
    assert settings.sqlalchemy_url == f"sqlite:///{path.resolve()}"
    assert path.exists()
    return path


def use_template(settings: Settings, template: Path) -> None:
    """Give `settings` a migrated SQLite database: a copy of the session's template."""
    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, settings.home / "medmaas.db")


@pytest.fixture()
def sqlite_settings(tmp_path, broker_url, sqlite_template) -> Settings:  # noqa: ANN001
    """Settings for a fresh, migrated SQLite database of this test's own."""
    settings = from_env({}, home=tmp_path / "home", broker_url=broker_url, testing=True, secret_key="test-secret",
                        **FAST_TIMINGS)
    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sqlite_template, settings.home / "medmaas.db")
    assert settings.sqlalchemy_url == f"sqlite:///{(settings.home / 'medmaas.db').resolve()}"
    return settings


def _make_app(settings: Settings):  # noqa: ANN202
    from app import create_app

    return create_app(settings)


def flush_read_audit(app) -> None:  # noqa: ANN001
    """Write the audit rows of reads this app has answered but not yet written (its ReadTrail
    batches them, app/api/auditing.py), as a reader of the trail through the API would."""
    from app.api.auditing import READ_TRAIL

    trail = app.extensions.get(READ_TRAIL)
    if trail is not None:
        trail.flush()


def close_app(app) -> None:  # noqa: ANN001
    """Stop what create_app started: the event hub's listener thread, the audit rows of reads
    still to write, and the database pool."""
    from app.api.auditing import READ_TRAIL

    trail = app.extensions.get(READ_TRAIL)
    if trail is not None:
        trail.stop()
    hub = app.extensions.get("medmaas.hub")
    if hub is not None:
        hub.close()
    app.extensions["medmaas.db"].dispose()


@pytest.fixture(scope="session")
def pg_app(pg_settings):  # noqa: ANN001, ANN201
    app = _make_app(pg_settings)
    yield app
    close_app(app)


@pytest.fixture()
def app(sqlite_settings):  # noqa: ANN001, ANN201
    """A SQLite-backed app for fast API tests (publishing to the `broker_url` fixture's Redis:
    fakeredis in unit tests)."""
    app = _make_app(sqlite_settings)
    yield app
    close_app(app)


@pytest.fixture()
def client(app):  # noqa: ANN001, ANN201
    return app.test_client()


@pytest.fixture()
def runner(app):  # noqa: ANN001, ANN201
    return app.test_cli_runner()


def create_tenant_key(app, name: Optional[str] = None) -> tuple[int, str]:  # noqa: ANN001
    from app import auth

    with app.extensions["medmaas.db"].session() as s:
        tenant = auth.create_tenant(s, name or f"t-{uuid.uuid4().hex[:8]}")
        return tenant.id, auth.create_key(s, tenant)


class ApiClient:
    """Flask test client bound to one tenant's key."""

    def __init__(self, client, key: str):  # noqa: ANN001
        self.client, self.key = client, key
        self.headers = {"Authorization": f"Bearer {key}"}

    def _call(self, method: str, path: str, **kw: Any):  # noqa: ANN202
        headers = {**self.headers, **kw.pop("headers", {})}
        return getattr(self.client, method)(path, headers=headers, **kw)

    def get(self, path: str, **kw: Any):  # noqa: ANN201
        return self._call("get", path, **kw)

    def post(self, path: str, **kw: Any):  # noqa: ANN201
        return self._call("post", path, **kw)

    def put(self, path: str, **kw: Any):  # noqa: ANN201
        return self._call("put", path, **kw)

    def submit(self, kind: str, spec: dict, **kw: Any) -> dict:
        r = self.post("/api/v1/jobs", json={"kind": kind, "spec": spec}, **kw)
        assert r.status_code in (200, 202), r.get_json()
        return r.get_json()

    def job(self, job_id: int) -> dict:
        r = self.get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    def events(self, job_id: int, after: int = 0) -> list[dict]:
        return self.get(f"/api/v1/jobs/{job_id}/events?after={after}").get_json()["items"]

    def wait(self, job_id: int, states=("succeeded", "failed", "cancelled"), timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}")


@pytest.fixture()
def api(client, app) -> ApiClient:  # noqa: ANN001
    return ApiClient(client, create_tenant_key(app)[1])


@pytest.fixture()
def pg_api(pg_app) -> ApiClient:  # noqa: ANN001
    return ApiClient(pg_app.test_client(), create_tenant_key(pg_app)[1])


class Processes:
    """Real worker / beat subprocesses for one test; all stopped (SIGKILL if needed) at teardown."""

    def __init__(self, settings: Settings, log_dir: Path):
        self.settings, self.log_dir = settings, log_dir
        self.procs: list[subprocess.Popen] = []

    def _start(self, args: list[str], extra_env: Optional[dict] = None) -> subprocess.Popen:
        env = {**os.environ, **to_env(self.settings), **(extra_env or {})}
        log = open(self.log_dir / f"{args[0]}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "medmaas.cli", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def worker(self, queues: str = "cpu,gpu", *extra: str, env: Optional[dict] = None) -> subprocess.Popen:
        return self._start(["worker", "--queues", queues, *extra], env)

    def beat(self) -> subprocess.Popen:
        return self._start(["beat"])

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        proc.send_signal(sig)
        proc.wait(30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture()
def processes(pg_settings, tmp_path) -> Callable[..., Processes]:  # noqa: ANN001
    created: list[Processes] = []

    def make(settings: Optional[Settings] = None) -> Processes:
        p = Processes(settings or pg_settings, tmp_path)
        created.append(p)
        return p

    yield make
    for p in created:
        p.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def sign_in(app, client, key_id: int, csrf: str = "token") -> None:  # noqa: ANN001
    """Sign a test client's browser in with the key `key_id` (a server-side web session, as
    POST /login opens) and set its CSRF token to `csrf`."""
    from app.models import ApiKey
    from app.web.session_auth import SESSION_ID, open_web_session

    with app.extensions["medmaas.db"].session() as s:
        token = open_web_session(s, s.get(ApiKey, key_id), app.extensions["medmaas.settings"])
        s.commit()
    with client.session_transaction() as sess:
        sess[SESSION_ID], sess["csrf"] = token, csrf


def seed_tiny_model(
    database: Any, store: Any, tenant_id: int, smiles: list[str], bundle_dir: Path, hidden_size: int = 8
) -> str:
    """Register model "tiny" v1 for a tenant: an untrained RNN over `smiles` (targets 0 to 1),
    its bundle written to `bundle_dir` through the artifact layer (`store`, an ArtifactStore)
    like a training job's; returns "tiny@1"."""
    import numpy as np
    import pandas as pd
    import torch

    from app.models import ModelVersion
    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.data import load_sequence_frame
    from workers.ml.models import build_model

    data = load_sequence_frame(
        pd.DataFrame({"smiles": smiles, "y": np.linspace(0, 1, len(smiles))}), target_columns="y", task="regression"
    )
    assert data.tokenizer is not None
    torch.manual_seed(0)
    model = build_model(
        "rnn",
        {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": hidden_size,
         "embedding_dim": hidden_size // 2},
    )
    bundle = save_bundle(bundle_dir, model, bundle_config(model, data))
    with database.session() as s:
        s.add(ModelVersion(tenant_id=tenant_id, name="tiny", version=1, arch="rnn", task="regression",
                           input_kind="smiles", spec={}, artifact_uri=store.url(bundle)))
    return "tiny@1"


def seed_tiny_model_and_library(database: Any, artifacts: Path, tenant_id: int, smiles: list[str]) -> int:
    """Register model "tiny" v1 (an untrained RNN over the first 50 SMILES) and a library of
    `smiles` for a tenant; return the library's dataset id."""
    from app.artifacts import ArtifactStore
    from app.ingest.library import ingest_library
    from app.models import Dataset

    store = ArtifactStore(artifacts)
    seed_tiny_model(database, store, tenant_id, smiles[:50], store.tenant_dir(tenant_id, "models", "tiny"))
    lib = store.tenant_dir(tenant_id, "datasets", "lib") / "lib.smi"
    lib.write_text("\n".join(f"{smi} m{i}" for i, smi in enumerate(smiles)) + "\n")
    report = ingest_library(str(lib), lib.name)
    with database.session() as s:
        ds = Dataset(
            tenant_id=tenant_id,
            name="lib",
            kind="library",
            filename=lib.name,
            bytes=lib.stat().st_size,
            sha256="0" * 64,
            rows=report.rows,
            schema=report.schema,
            stats={},
            options={},
            uri=store.url(lib),
            data_uri=store.url(lib),
        )
        s.add(ds)
        s.flush()
        return ds.id


def get_latencies(http: Any, url: str, n: int) -> list[float]:
    """Seconds each of `n` GETs of `url` took (each must answer 200)."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = http.get(url, timeout=30)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return out


def usage_quantities(database: Any, tenant_id: int) -> dict[tuple[str, str, int], float]:
    """A tenant's usage rows as {(metric, model, version): quantity summed over days}."""
    from sqlalchemy import select

    from app.models import Usage

    out: dict[tuple[str, str, int], float] = {}
    with database.session() as s:
        for row in s.scalars(select(Usage).where(Usage.tenant_id == tenant_id)):
            key = (row.metric.value, row.model, row.version)
            out[key] = out.get(key, 0.0) + row.quantity
    return out
