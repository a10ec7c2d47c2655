"""The seeded workload: several tenants submitting sleep jobs (with steps), small train jobs
(a tiny RNN on examples/solubility.csv, 2-3 epochs), score jobs (a few hundred SMILES of
examples/library.smi against a registered tiny model), predict jobs and online predict
calls (POST /api/v1/models/tiny/predict: answered by an inference worker, or by a predict
job it falls back to), through the API.

Every submit carries an Idempotency-Key and is retried (same key) while the web tier answers
5xx or raises (a database fail-over, a Redis restart): a job is *accepted* once the API
answered 200/202 with its id, and the oracle holds the platform to every accepted job. An online predict call is retried
the same way (it has no Idempotency-Key: a call that failed may leave a predict job behind,
which the oracle counts); its 200 answer must hold one prediction per input, and a predict
job it names (a 200 with job_id, a 202) is accepted like any other."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, ApiClient, create_tenant_key, seed_tiny_model_and_library

LIBRARY_ROWS = 500
MAX_ATTEMPTS = 6  # room for three kills of one job (and a reaped attempt besides)
PREDICT_MODEL = "tiny"  # seed_tiny_model_and_library's
TRAIN_MODEL = {"cell": "gru", "embedding_dim": 8, "hidden_size": 16}


def library_smiles(n: int) -> list[str]:
    """The first n SMILES of examples/library.smi (MOSES molecules)."""
    lines = (ROOT / "examples" / "library.smi").read_text().splitlines()[1:]
    return [line.split()[0] for line in lines[:n]]


@dataclass
class Tenant:
    id: int
    api: Any  # ApiClient (this process's app) or deployment.WebClient (the `medmaas web` process)
    dataset_id: int
    library_id: int


@dataclass
class Accepted:
    """A job the API accepted, with what the oracle needs to judge its outcome."""

    id: int
    tenant_id: int
    kind: str
    spec: dict[str, Any]
    submitted_at: float
    idempotency_key: str
    via: str = "jobs"  # "jobs": POST /api/v1/jobs (audited job.create); "predict": the model's predict route


@dataclass
class Workload:
    tenants: list[Tenant]
    rng: random.Random
    jobs: list[Accepted] = field(default_factory=list)
    submit_retries: int = 0
    library_ids: list[str] = field(default_factory=list)
    smiles: list[str] = field(default_factory=list)
    online_calls: int = 0  # predict calls answered 200 with the predictions and no job
    failed_calls: int = 0  # predict calls answered 5xx or not at all (each may leave a job behind)
    problems: list[str] = field(default_factory=list)  # wrong answers of the predict route

    def submit(self, tenant: Tenant, kind: str, spec: dict[str, Any], timeout_s: float = 60.0) -> Accepted:
        key = f"chaos-{uuid.uuid4().hex}"
        body = {"kind": kind, "spec": spec, "max_attempts": MAX_ATTEMPTS}
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                r = tenant.api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key})
            except Exception as exc:  # the web tier's database or broker is down: retry, same key
                last = repr(exc)
            else:
                if r.status_code in (200, 202):
                    job = Accepted(r.get_json()["id"], tenant.id, kind, spec, time.monotonic(), key)
                    self.jobs.append(job)
                    return job
                last = (r.status_code, r.get_json())
                if r.status_code < 500:
                    raise AssertionError(f"submit of {kind} refused: {last}")
            self.submit_retries += 1
            time.sleep(0.2)
        raise AssertionError(f"submit of {kind} not accepted within {timeout_s}s: {last}")

    def tenant(self, rng: random.Random | None = None) -> Tenant:
        return (rng or self.rng).choice(self.tenants)

    def sleep(self, rng: random.Random | None = None, seconds: float | None = None) -> Accepted:
        rng = rng or self.rng
        seconds = round(rng.uniform(1.0, 3.0), 2) if seconds is None else seconds
        steps = rng.randint(4, 12)
        return self.submit(self.tenant(rng), "sleep", {"seconds": seconds, "steps": steps})

    def train(self, rng: random.Random | None = None, epochs: int | None = None) -> Accepted:
        rng = rng or self.rng
        tenant = self.tenant(rng)
        spec = {
            "model_name": f"chaos-{uuid.uuid4().hex[:8]}",
            "dataset_id": tenant.dataset_id,
            "arch": "rnn",
            "task": "regression",
            "target": "solubility",
            "epochs": epochs or rng.randint(2, 3),
            "batch_size": 32,
            "lr": 3e-3,
            "seed": rng.randint(0, 1000),
            "model": TRAIN_MODEL,
            "explain_faithfulness": False,
        }
        return self.submit(tenant, "train", spec)

    def score(self, rng: random.Random | None = None) -> Accepted:
        tenant = self.tenant(rng)
        spec = {"model": "tiny", "library_id": tenant.library_id, "output": "parquet", "top_k": 5}
        return self.submit(tenant, "score", spec)

    def _inputs(self, rng: random.Random) -> list[str]:
        start = rng.randrange(len(self.smiles) - 20)
        return self.smiles[start : start + rng.randint(1, 20)]

    def predict(self, rng: random.Random | None = None) -> Accepted:
        """A predict job through POST /api/v1/jobs."""
        rng = rng or self.rng
        return self.submit(self.tenant(rng), "predict", {"model": PREDICT_MODEL, "inputs": self._inputs(rng)})

    def predict_online(self, rng: random.Random | None = None, timeout_s: float = 60.0) -> Accepted | None:
        """One call of the online predict route. Returns the predict job it answered with (a
        200 naming job_id, a 202), or None when an inference worker answered it directly."""
        rng = rng or self.rng
        tenant = self.tenant(rng)
        inputs = self._inputs(rng)
        body = {"inputs": inputs, "timeout": 5}
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                r = tenant.api.post(f"/api/v1/models/{PREDICT_MODEL}/predict", json=body)
            except Exception as exc:  # the web tier's database or broker is down: call again
                last = repr(exc)
            else:
                if r.status_code in (200, 202):
                    answer = r.get_json()
                    job_id = answer.get("job_id") if r.status_code == 200 else answer["id"]
                    if r.status_code == 200 and len(answer.get("predictions", [])) != len(inputs):
                        self.problems.append(
                            f"predict route answered {len(answer.get('predictions', []))} predictions "
                            f"for {len(inputs)} inputs"
                        )
                    if job_id is None:
                        self.online_calls += 1
                        return None
                    spec = {"model": PREDICT_MODEL, "inputs": inputs}
                    job = Accepted(int(job_id), tenant.id, "predict", spec, started, "", via="predict")
                    self.jobs.append(job)
                    return job
                last = (r.status_code, r.get_json())
                if r.status_code < 500:
                    raise AssertionError(f"predict call refused: {last}")
            self.failed_calls += 1
            time.sleep(0.2)
        raise AssertionError(f"predict call not answered within {timeout_s}s: {last}")

    def mixed(self, n: int, rng: random.Random | None = None) -> list[Accepted]:
        """n jobs or calls of random kinds (sleep the most, they are the cheapest); an online
        predict call answered without a job adds nothing to the list."""
        rng = rng or self.rng
        pick = {
            "sleep": self.sleep,
            "train": self.train,
            "score": self.score,
            "predict": self.predict,
            "predict_online": self.predict_online,
        }
        kinds = rng.choices(list(pick), weights=[3, 1, 1, 1, 2], k=n)
        return [job for job in (pick[k](rng) for k in kinds) if job is not None]


def upload_sequences(api: ApiClient, path: Path) -> int:
    with open(path, "rb") as fh:
        r = api.post(
            "/api/v1/datasets",
            data={"kind": "sequences", "file": (fh, path.name), "label_columns": "solubility"},
            content_type="multipart/form-data",
        )
    assert r.status_code == 201, r.get_json()
    return int(r.get_json()["id"])


def make_workload(
    app: Any, settings: Any, rng: random.Random, tenants: int = 3, client: Callable[[str], Any] | None = None
) -> Workload:
    """Tenants with their API keys, a sequences dataset each (for train) and a tiny registered
    model plus a library of LIBRARY_ROWS MOSES SMILES each (for score and predict). client(key):
    the API client the tenant's requests go through (Deployment.client: the `medmaas web`
    process; default: this process's app)."""
    smiles = library_smiles(LIBRARY_ROWS)
    made = []
    for i in range(tenants):
        tenant_id, key = create_tenant_key(app, f"chaos-{i}-{uuid.uuid4().hex[:6]}")
        api = client(key) if client is not None else ApiClient(app.test_client(), key)
        dataset_id = upload_sequences(api, ROOT / "examples" / "solubility.csv")
        library_id = seed_tiny_model_and_library(app.extensions["medmaas.db"], settings.artifacts, tenant_id, smiles)
        made.append(Tenant(tenant_id, api, dataset_id, library_id))
    return Workload(made, rng, library_ids=[f"m{i}" for i in range(len(smiles))], smiles=smiles)
