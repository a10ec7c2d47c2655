"""The OpenAPI document is a contract other tools can consume: a standard generator
(openapi-python-client) builds a client from the live /api/v1/openapi.json, offline, and that
generated package (not medmaas.client) uploads a dataset (multipart), submits a train job,
follows it to the end and fetches its result and the model's weights, against a live server
on PostgreSQL + Redis with a real worker subprocess."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from tests.conftest import ROOT, create_tenant_key
from tests.e2e.live_server import LiveServer

pytestmark = pytest.mark.integration

# What the generator may warn about: a response in a media type it has no model for (an SVG
# drawing, NDJSON lines) is left to the caller as bytes. Anything else it cannot read fails.
TOLERATED_WARNING = re.compile(r"Unsupported content_type ")


@pytest.fixture(scope="module")
def server(pg_app):
    srv = LiveServer(pg_app).start()
    yield srv
    srv.stop()


def live_document(url: str) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    with opener.open(f"{url}/api/v1/openapi.json", timeout=30) as r:
        return json.load(r)


def _generator() -> list[str]:
    script = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "openapi_python_client"]


def generate_client(document: dict[str, Any], work: Path) -> tuple[str, str]:
    """Run openapi-python-client on `document`; returns (package name, generator output). No
    network: every proxy variable points at a closed port, so a download would fail the run;
    the generator's post-hooks (ruff check --fix, ruff format) run from this environment."""
    package = f"medmaas_generated_{uuid.uuid4().hex[:8]}"
    spec_path = work / "openapi.json"
    spec_path.write_text(json.dumps(document))
    config = work / "generator.yaml"
    config.write_text(json.dumps({"package_name_override": package, "project_name_override": package}))
    dead = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        HTTP_PROXY=dead,
        HTTPS_PROXY=dead,
        ALL_PROXY=dead,
        http_proxy=dead,
        https_proxy=dead,
        all_proxy=dead,
        NO_PROXY="",
        no_proxy="",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RUFF_NO_CACHE="true",
    )
    run = subprocess.run(
        [
            *_generator(),
            "generate",
            "--path",
            str(spec_path),
            "--config",
            str(config),
            "--meta",
            "none",
            "--output-path",
            str(work / package),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert (work / package / "client.py").exists(), output
    return package, output


def generator_warnings(output: str) -> list[str]:
    """Each `WARNING parsing <operation>` the generator printed, with the reason under it."""
    blocks = re.split(r"\n(?=WARNING )", output)
    return [" ".join(block.split("\n\n")[:2]) for block in blocks if block.startswith("WARNING ")]


@pytest.fixture(scope="module")
def generated(server, tmp_path_factory) -> ModuleType:
    work = tmp_path_factory.mktemp("generated-client")
    package, output = generate_client(live_document(server.url), work)
    assert "Error(s) encountered" not in output, output
    assert "is not in PATH" not in output, output  # the post-hooks (ruff) ran
    unexpected = [w for w in generator_warnings(output) if not TOLERATED_WARNING.search(w)]
    assert unexpected == [], output
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module(package)
    finally:
        sys.path.remove(str(work))
        for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[name]


def part(package: ModuleType, name: str) -> ModuleType:
    return importlib.import_module(f"{package.__name__}.{name}")


def tiny_solubility(dest: Path, rows: int = 160) -> Path:
    """The first rows of the README's solubility example (SMILES, logS)."""
    lines = (ROOT / "examples" / "solubility.csv").read_text().splitlines()
    dest.write_text("\n".join(lines[: rows + 1]) + "\n")
    return dest


def test_a_generated_client_uploads_trains_follows_and_downloads(
    server,
    generated,
    pg_app,
    processes,
    tmp_path: Path,
) -> None:
    assert "medmaas.client" not in getattr(generated, "__file__", "")
    models = part(generated, "models")
    types = part(generated, "types")
    datasets_upload = part(generated, "api.datasets.datasets_upload")
    jobs_submit = part(generated, "api.jobs.jobs_submit")
    jobs_detail = part(generated, "api.jobs.jobs_detail")
    jobs_events = part(generated, "api.jobs.jobs_events")
    jobs_result = part(generated, "api.jobs.jobs_result")
    version_detail = part(generated, "api.models.models_version_detail")
    version_file = part(generated, "api.models.models_version_file")

    procs = processes()
    procs.worker("cpu,gpu")
    _, key = create_tenant_key(pg_app)
    # an answer the document does not list raises instead of passing silently
    client = part(generated, "client").AuthenticatedClient(
        base_url=server.url, token=key, timeout=60.0, raise_on_unexpected_status=True
    )
    with client:
        # 1. upload (multipart: the form fields, an extra ingest option, the file)
        data = tiny_solubility(tmp_path / "tiny-solubility.csv")
        with open(data, "rb") as fh:
            body = models.DatasetsUploadBody(
                kind=models.DatasetsUploadBodyKind.SEQUENCES,
                file=types.File(payload=fh, file_name=data.name, mime_type="text/csv"),
                name="tiny-solubility",
            )
            body["label_columns"] = "solubility"
            uploaded = datasets_upload.sync_detailed(client=client, body=body)
        assert uploaded.status_code == 201, uploaded.content
        ds = uploaded.parsed
        assert isinstance(ds, models.Dataset)
        assert (ds.kind, ds.rows, ds.invalid_rows, ds.bytes_) == ("sequences", 160, 0, data.stat().st_size)
        assert ds.status == models.DatasetStatus.READY

        # 2. a spec the server refuses comes back as the documented error body, naming the field
        def train(**overrides: Any) -> Any:
            spec = models.TrainSpec(
                model_name="generated-sol",
                dataset_id=ds.id,
                arch=models.TrainSpecArch.RNN,
                task=models.TrainSpecTask.REGRESSION,
                target="solubility",
                epochs=3,
                batch_size=32,
                lr=3e-3,
                seed=1,
                explain_faithfulness=False,
                model=models.TrainSpecModel.from_dict({"hidden_size": 16, "embedding_dim": 8}),
            )
            for name, value in overrides.items():
                setattr(spec, name, value)
            return jobs_submit.sync_detailed(
                client=client, body=models.TrainJobSubmit(kind=models.TrainJobSubmitKind.TRAIN, spec=spec)
            )

        refused = train(epochs=0)
        assert refused.status_code == 422
        assert isinstance(refused.parsed, models.ErrorBody)
        assert refused.parsed.error.code == "invalid_spec"
        assert "epochs" in json.dumps(refused.parsed.error.to_dict()["details"])

        # 3. submit a small train job and follow it to the end
        submitted = train()
        assert submitted.status_code == 202, submitted.content
        job = submitted.parsed
        assert isinstance(job, models.Job)
        assert job.kind == "train"
        deadline = time.monotonic() + 600
        while job.state not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, (job.to_dict(), procs.logs())
            time.sleep(0.5)
            job = jobs_detail.sync(job.id, client=client)
            assert isinstance(job, models.Job)
        assert job.state == "succeeded", (job.error, procs.logs())
        assert job.progress == 1.0
        events = jobs_events.sync(job.id, client=client)
        assert isinstance(events, models.EventList)
        assert events.state == "succeeded"
        assert [e.data["epoch"] for e in events.items if e.type_ == "metric"] == [1, 2, 3]

        # 4. its result (JSON) and the registered model's weights (safetensors)
        result = jobs_result.sync_detailed(job.id, client=client)
        assert result.status_code == 200
        outcome = json.loads(result.content)
        assert outcome["model"] == "generated-sol"
        assert outcome["epochs_trained"] == 3
        assert np.isfinite(outcome["metrics"]["test"]["rmse"])
        version = version_detail.sync("generated-sol", outcome["version"], client=client)
        assert isinstance(version, models.ModelVersion)
        assert version.dataset_sha256 == ds.sha256
        assert version.metrics["test"]["rmse"] == outcome["metrics"]["test"]["rmse"]
        weights = version_file.sync_detailed("generated-sol", outcome["version"], "weights", client=client)
        assert weights.status_code == 200
        tensors = load_safetensors(weights.content)
        assert tensors
        assert all(np.isfinite(t).all() for t in tensors.values())
