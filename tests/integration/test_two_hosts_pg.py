"""Two worker hosts, no shared filesystem: one scoring job spreads over both, one host is
SIGKILLed mid-job, and the other finishes it with every library row in the result once.

The hosts are network namespaces of this machine (tests/hosts.py), each with its own hostname
and an empty private tmpfs for its artifact cache and scratch, reaching PostgreSQL, Redis and
a real S3 endpoint (moto's server, tests/s3.py) only over their veth links. The artifacts'
store of record is the bucket (MEDMAAS_ARTIFACT_STORE=s3://...): the library, the model
bundle and every shard's part travel through it. The control plane (the API and `medmaas
beat`) runs on this machine with a cache of its own.

Needs root (CI runs as root): where namespaces cannot be made as root the test fails saying
why; it is skipped, saying why, only for a non-root user.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from app.config import Settings, from_env, to_env
from tests import hosts
from tests.chaos.deployment import CHAOS_TIMINGS, Managed, RedisServer
from tests.conftest import ApiClient, close_app, create_tenant_key, seed_tiny_model, throwaway_pg_database, wait_until
from tests.integration.test_scoring import moses_smiles
from tests.s3 import make_bucket, s3_endpoint  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.integration,
    # Network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); as root (CI), a machine that
    # still cannot make them fails the test (require_hosts).
    pytest.mark.skipif(os.geteuid() != 0, reason="two worker hosts need network namespaces, which need root"),
]

N_ROWS = 24_000
SHARD_ROWS = 1_000  # 24 shards: enough that both hosts take some before one is killed
TERMINAL = {"succeeded", "failed", "cancelled"}


def require_hosts() -> None:
    reason = hosts.unavailable()
    if reason is not None:
        pytest.fail(f"running as root, yet worker hosts cannot be made here: {reason}")


@contextlib.contextmanager
def control_plane(work: Path, endpoint: str) -> Iterator[tuple[Settings, Any]]:
    """A throwaway PostgreSQL database, a private Redis, a fresh bucket; the app (the API in
    this process) and `medmaas beat` (the reaper) on this machine."""
    from app import create_app
    from app.migrate import upgrade

    server = RedisServer(work / "redis")
    server.start()
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        url = stack.enter_context(throwaway_pg_database("medmaas_hosts"))
        settings = from_env(
            {},
            home=work / "control",
            database_url=url,
            broker_url=server.url,
            artifact_store=f"s3://{make_bucket(endpoint)}/artifacts",
            s3_endpoint_url=endpoint,
            score_shard_rows=SHARD_ROWS,
            score_batch_size=250,
            rate_limit_enabled=False,
            torch_threads=1,
            testing=True,
            secret_key="two-hosts-secret",
            **CHAOS_TIMINGS,
        )
        upgrade(settings)
        app = create_app(settings)
        stack.callback(close_app, app)
        beat = Managed("beat", [sys.executable, "-m", "medmaas.cli", "beat"], {**os.environ, **to_env(settings)}, work)
        beat.start()
        stack.callback(beat.stop)
        yield settings, app


def seed_model(app: Any, settings: Settings, tenant_id: int) -> str:
    """Register "tiny" v1, an (untrained) RNN bundle written to the store through the artifact
    layer like a training job's; returns its name@version."""
    from app.artifacts import ArtifactStore

    store = ArtifactStore.from_settings(settings)
    return seed_tiny_model(
        app.extensions["medmaas.db"], store, tenant_id, moses_smiles(200), store.new_dir(tenant_id, "models"), 16
    )


def library(path: Path) -> list[tuple[str, str]]:
    """N_ROWS MOSES molecules as a gzip CSV (id, smiles); returns its rows."""
    rows = [(f"mol-{i}", smi) for i, smi in enumerate(moses_smiles(N_ROWS, skip=50_000))]
    with gzip.open(path, "wt") as fh:
        fh.write("id,smiles\n")
        fh.writelines(f"{ident},{smi}\n" for ident, smi in rows)
    return rows


def shards(app: Any, job_id: int) -> list[tuple[int, str, int, str]]:
    """(index, state, attempts, worker holding or last holding its lease) of every shard."""
    from app.models import ScoreShard

    with app.extensions["medmaas.db"].session() as s:
        return [
            (sh.index, sh.state.value, sh.attempts, sh.worker or "")
            for sh in s.scalars(select(ScoreShard).where(ScoreShard.job_id == job_id).order_by(ScoreShard.index))
        ]


def done_by(snapshot: list[tuple[int, str, int, str]]) -> dict[str, int]:
    """Shards done per host name (worker names are host:pid)."""
    out: dict[str, int] = {}
    for _, state, _, worker in snapshot:
        if state == "done":
            host = worker.split(":", 1)[0]
            out[host] = out.get(host, 0) + 1
    return out


def test_one_scoring_job_spreads_over_two_hosts_and_survives_losing_one(tmp_path: Path, s3_endpoint: str) -> None:  # noqa: F811
    require_hosts()
    with control_plane(tmp_path, s3_endpoint) as (settings, app):
        tenant_id, key = create_tenant_key(app)
        api = ApiClient(app.test_client(), key)
        model = seed_model(app, settings, tenant_id)
        rows = library(tmp_path / "library.csv.gz")
        with open(tmp_path / "library.csv.gz", "rb") as fh:
            r = api.post(
                "/api/v1/datasets",
                data={"kind": "library", "file": (fh, "library.csv.gz")},
                content_type="multipart/form-data",
            )
        assert r.status_code == 201, r.get_json()
        assert r.get_json()["rows"] == N_ROWS

        with hosts.worker_hosts(["a", "b"], settings, tmp_path, env={"OMP_NUM_THREADS": "1"}) as (a, b):

            def logs() -> str:
                return "\n".join(h.log_tail() for h in (a, b))

            job = api.submit("score", {"model": model, "library_id": r.get_json()["id"], "output": "parquet"})
            # both hosts score shards; then the host running the job itself (the parent, which
            # merges at the end) loses power
            wait_until(
                lambda: len(done_by(shards(app, job["id"]))) == 2 or api.job(job["id"])["state"] in TERMINAL,
                180,
                0.05,
                what="both hosts to finish a shard",
            )
            parent = api.job(job["id"])
            assert parent["state"] == "running", (parent, logs())
            victim = next(h for h in (a, b) if parent["worker"] == h.worker_name)
            survivor = b if victim is a else a
            victim.kill()
            at_kill = shards(app, job["id"])
            assert not victim.alive()
            assert sum(state == "done" for _, state, _, _ in at_kill) < len(at_kill), "the job was over before the kill"
            assert set(done_by(at_kill)) == {"host-a", "host-b"}, at_kill

            done = api.wait(job["id"], timeout=300)
            assert done["state"] == "succeeded", (done["error"], logs())
            assert done["attempts"] == 2  # the parent ran again, on the survivor
            assert done["worker"] == survivor.worker_name
            final = shards(app, job["id"])
            assert len(final) == N_ROWS // SHARD_ROWS
            assert all(state == "done" for _, state, _, _ in final)
            before = {i: (state, worker) for i, state, _, worker in at_kill if state == "done"}
            for i, state, _, worker in final:
                if i in before:
                    assert (state, worker) == before[i], f"shard {i}, finished before the kill, ran again"
            assert set(done_by(final)) == {"host-a", "host-b"}
            stranded = {i for i, state, _, worker in at_kill if state == "running" and worker == victim.worker_name}
            for i, _, attempts, worker in final:
                if i in stranded:  # what the victim held was taken over by the survivor
                    assert worker == survivor.worker_name, (i, final)
                    assert attempts >= 2, (i, final)

            # the result: every library row exactly once, in order, each with a score
            r = api.get(f"/api/v1/jobs/{job['id']}/result?format=parquet")
            assert r.status_code == 200, r.get_json()
            table = pq.read_table(io.BytesIO(r.data), columns=["row", "id", "smiles", "valid"]).to_pydict()
            assert table["row"] == list(range(N_ROWS))
            assert list(zip(table["id"], table["smiles"], strict=True)) == rows
            assert done["result"]["rows"] == N_ROWS
            assert done["result"]["valid"] == sum(table["valid"])
            assert set(done["result"]["shards"]["workers"]) == {a.worker_name, b.worker_name}

            # nothing crossed between the hosts but the bucket: their homes are private tmpfs
            # mounts, so from here the directories are still empty
            for h in (a, b):
                assert not any(h.home.iterdir()), f"{h.name} wrote to this machine's filesystem"


def test_hosts_refuse_a_store_they_cannot_reach(tmp_path: Path) -> None:
    settings = from_env({}, home=tmp_path / "home")
    with pytest.raises(ValueError, match="s3://"):
        hosts.WorkerHost("x", settings, tmp_path)
