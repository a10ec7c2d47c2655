"""Schemathesis against a live server: every operation of /api/v1/openapi.json, all checks
(no 5xx, status codes, content types, headers and bodies as documented, invalid input
refused, valid input accepted, ...), on PostgreSQL and Redis, as `medmaas web` serves it.
Any finding fails the test; the run is bounded (examples per operation) to a few minutes.

The fuzzer signs in with an admin key of its own tenant, so every route is reachable; the
hooks in tests/integration/fuzz_hooks.py keep it from revoking its own key and from
holding an event stream open on a job no worker will run (see there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from app import auth, jobs
from app.config import from_env
from app.db import Database
from app.migrate import upgrade
from app.models import KeyRole
from tests.conftest import FAST_TIMINGS, ROOT, throwaway_pg_database
from tests.integration.test_sse import WebServer

pytestmark = pytest.mark.integration

# Where schema-valid data is still refused, and why (the one check relaxed, per operation):
# positive_data_acceptance also accepts 422 there. Every other check stays as it is.
SEMANTIC_422 = {
    # a schema-valid spec may name a dataset or model that does not exist (unknown_dataset,
    # unknown_model), or a kind's cross-field rule (e.g. epochs x rows) that JSON Schema
    # cannot state; the fuzzer cannot know the tenant's ids
    "POST /api/v1/jobs",
    # inputs are checked against the model's own limits (max_len) once the model is found
    "POST /api/v1/models/{name}/predict",
    # a report covers at most 366 days: a bound between two query parameters
    "GET /api/v1/usage",
    # the uploaded file's content is validated (format, rows); a generated file is rarely valid
    "POST /api/v1/datasets",
    # a clone's spec change is validated like a submission (the kind's schema and checks)
    "POST /api/v1/jobs/{job_id}/clone",
}
POSITIVE_EXPECTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # Schemathesis' default

MAX_EXAMPLES = int(os.environ.get("MEDMAAS_FUZZ_MAX_EXAMPLES", "40"))  # per operation and phase: ~1.5 min
SEED = os.environ.get("MEDMAAS_FUZZ_SEED", "20261202")


@pytest.fixture(scope="module")
def fuzz_settings(tmp_path_factory, redis_url):  # noqa: ANN001, ANN201
    with throwaway_pg_database("medmaas_fuzz") as url:
        settings = from_env({}, home=tmp_path_factory.mktemp("fuzz-home"), database_url=url, broker_url=redis_url,
                            # thousands of requests from one key: the rate limits would answer most of
                            # them 429 (tests/unit/test_limits.py covers those answers)
                            secret_key="fuzz-secret", rate_limit_enabled=False, **FAST_TIMINGS)
        upgrade(settings)
        yield settings


def seed(settings) -> dict[str, str]:  # noqa: ANN001
    """The fuzzer's tenant: its admin key, another admin key for it to revoke and rotate, and
    a finished job."""
    db = Database(settings.sqlalchemy_url)
    try:
        with db.session() as s:
            tenant = auth.create_tenant(s, "fuzz")
            own, secret = auth.new_key(s, tenant.id, "fuzzer", KeyRole.admin)
            victim, _ = auth.new_key(s, tenant.id, "victim", KeyRole.admin)
            job, _ = jobs.submit(s, tenant_id=tenant.id, kind="sleep", spec={"seconds": 0}, queue="cpu")
            jobs.request_cancel(s, job.id)  # queued: cancelled at once
            return {"FUZZ_SECRET": secret, "FUZZ_OWN_KEY_ID": str(own.id), "FUZZ_VICTIM_KEY_ID": str(victim.id),
                    "FUZZ_JOB_ID": str(job.id)}
    finally:
        db.dispose()


def upload_examples(base_url: str, secret: str) -> list[int]:
    """Two real datasets (the README's examples), so operations on a dataset id reach past 404."""
    ids = []
    for kind, name, extra in (("sequences", "solubility.csv", {"label_columns": "solubility"}),
                              ("library", "library.smi", {})):
        with open(ROOT / "examples" / name, "rb") as fh:
            r = requests.post(f"{base_url}/api/v1/datasets", headers={"Authorization": f"Bearer {secret}"},
                              data={"kind": kind, **extra}, files={"file": (name, fh)}, timeout=60)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def schemathesis_config(dataset_ids: list[int], job_id: int) -> str:
    """Known ids are drawn half of the time for their path parameters (the rest stay random),
    and the relaxed check of SEMANTIC_422."""
    lines = [
        f"[dictionaries.datasets]\nvalues = {json.dumps(dataset_ids)}\n",
        f"[dictionaries.jobs]\nvalues = [{job_id}]\n",
        "[parameters]\n",
        '"path.dataset_id" = { dictionary = "datasets", probability = 0.5 }\n',
        '"path.job_id" = { dictionary = "jobs", probability = 0.5 }\n',
    ]
    for name in sorted(SEMANTIC_422):
        lines.append(f'[[operations]]\ninclude-name = "{name}"\n'
                     f"[operations.checks.positive_data_acceptance]\n"
                     f"expected-statuses = {json.dumps(POSITIVE_EXPECTED + ['422'])}\n")
    return "".join(lines)


@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(fuzz_settings, tmp_path: Path) -> None:  # noqa: ANN001
    ids = seed(fuzz_settings)
    server = WebServer(fuzz_settings, tmp_path, workers=1)
    report = tmp_path / "report"
    config = tmp_path / "schemathesis.toml"
    try:
        config.write_text(schemathesis_config(upload_examples(server.url, ids["FUZZ_SECRET"]), int(ids["FUZZ_JOB_ID"])))
        env = {**os.environ, **ids, "FUZZ_BASE_URL": server.url, "SCHEMATHESIS_HOOKS": "tests.integration.fuzz_hooks",
               "PYTHONPATH": str(ROOT)}
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
             f"{server.url}/api/v1/openapi.json",
             "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", SEED,
             # one worker: Hypothesis parses lambdas with `ast`, which CPython 3.11 cannot do in
             # parallel threads ("AST constructor recursion depth mismatch", a runtime error)
             "--workers", "1",
             "--header", f"Authorization: Bearer {ids['FUZZ_SECRET']}", "--request-timeout", "30",
             "--report", "junit,ndjson", "--report-dir", str(report), "--no-color"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=540)
    finally:
        server.stop()
    output = run.stdout + run.stderr
    (report / "schemathesis.txt").write_text(output)
    cases = count_cases(report)
    print(output[-6000:])
    print(f"fuzz cases run: {cases}")
    assert run.returncode == 0, f"{output[-12000:]}\n--- server log ---\n{server.log()}"
    assert cases >= 1000, output[-3000:]


def count_cases(report: Path) -> int:
    """Test cases the run sent (each one request and its checks), from the ndjson event log."""
    total = 0
    for path in report.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            for name, body in event.items():
                if name == "ScenarioFinished":
                    total += len((body.get("recorder") or {}).get("cases") or {})
    return total


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    # what the fuzzer found: a 500 from PostgreSQL refusing a NUL in the score spec's model name
    ("post", "/api/v1/jobs", {"kind": "score", "spec": {"model": "m\u0000x", "library_id": 1}}, 422),
    ("post", "/api/v1/jobs", {"kind": "sleep", "spec": {"seconds": 0, "queue": "cpu\u0000"}}, 422),
    ("get", "/api/v1/models/m%00x", None, 404),
    ("get", "/api/v1/jobs?kind=sl%00eep", None, 422),
])
def test_a_nul_character_is_a_4xx_on_postgresql(pg_api, method: str, path: str, body: dict | None,  # noqa: ANN001
                                                 status: int) -> None:
    r = getattr(pg_api, method)(path, **({"json": body} if body is not None else {}))
    assert r.status_code == status, r.get_json()


def test_a_nul_in_a_multipart_field_is_a_400_from_the_database(pg_api) -> None:  # noqa: ANN001
    """Multipart fields are read by the view, after the edge checks: PostgreSQL's refusal of
    the NUL in the dataset's name is answered 400 too, and nothing is stored."""
    before = pg_api.get("/api/v1/datasets").get_json()["items"]
    with open(ROOT / "examples" / "solubility.csv", "rb") as fh:
        r = pg_api.post("/api/v1/datasets", data={"kind": "sequences", "name": "sol\x00ubility",
                                                   "label_columns": "solubility", "file": (fh, "solubility.csv")},
                        content_type="multipart/form-data")
    assert r.status_code == 400 and "NUL" in r.get_json()["error"]["message"], r.get_json()
    assert pg_api.get("/api/v1/datasets").get_json()["items"] == before
