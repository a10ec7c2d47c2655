"""The `medmaas` client commands and the Python client against a live server (werkzeug, in a
thread) on PostgreSQL + Redis, with real worker subprocesses. The CLI runs as the installed
`medmaas` console script in a subprocess, so exit codes and output are the user's."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from medmaas.standalone import free_port
from medmaas.client import Client, MedmaasError
from tests.conftest import create_tenant_key, wait_until
from tests.e2e.live_server import LiveServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(pg_app):  # noqa: ANN001, ANN201
    srv = LiveServer(pg_app).start()
    yield srv
    srv.stop()


@pytest.fixture()
def key(pg_app) -> str:  # noqa: ANN001
    return create_tenant_key(pg_app)[1]


@pytest.fixture()
def client(server, key) -> Client:  # noqa: ANN001
    with Client(server.url, key) as c:
        yield c
        for job in c.iter_jobs():  # leave nothing running for the next test's worker
            if job["state"] in ("queued", "running"):
                c.cancel(job["id"])


def _medmaas_command() -> list[str]:
    script = shutil.which("medmaas", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "medmaas.cli"]


class Cli:
    def __init__(self, home: Path):
        self.home = home
        self.config = home / "cfg" / "medmaas" / "config.json"
        self.env = {k: v for k, v in os.environ.items() if k not in ("MEDMAAS_URL", "MEDMAAS_API_KEY")}
        self.env.update(HOME=str(home), MEDMAAS_CLIENT_CONFIG=str(self.config), COLUMNS="120", NO_COLOR="1")

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*_medmaas_command(), *args], env=self.env, cwd=self.home, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*_medmaas_command(), *args], env=self.env, cwd=self.home, text=True,
                              capture_output=True, timeout=timeout)


@pytest.fixture()
def cli(tmp_path) -> Cli:  # noqa: ANN001
    return Cli(tmp_path)


def submitted_id(out: str) -> int:
    match = re.search(r"Submitted job (\d+)", out)
    assert match, out
    return int(match.group(1))


def test_login_saves_a_private_config_and_bad_keys_get_a_clear_message(cli, server, key) -> None:  # noqa: ANN001
    bad = cli("login", server.url, "--key", "mm_000000000000_wrong")
    assert bad.returncode == 3
    assert "API key was rejected" in bad.stderr and "Traceback" not in bad.stderr + bad.stdout
    assert not cli.config.exists()

    nobody = cli("login", f"http://127.0.0.1:{free_port()}", "--key", key)
    assert nobody.returncode == 3 and "Cannot reach the MedMaaS server" in nobody.stderr
    assert "Traceback" not in nobody.stderr

    not_logged_in = cli("jobs", "list")
    assert not_logged_in.returncode == 3 and "medmaas login" in not_logged_in.stderr

    ok = cli("login", server.url, "--key", key)
    assert ok.returncode == 0, ok.stderr
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    assert json.loads(cli.config.read_text()) == {"url": server.url, "key": key}
    listed = cli("jobs", "list")
    assert listed.returncode == 0 and "no jobs" in listed.stdout

    # A key revoked (or mistyped) after login: every command says so, exit 3, no traceback.
    cli.config.write_text(json.dumps({"url": server.url, "key": key[:-4] + "AAAA"}))
    rejected = cli("jobs", "list")
    assert rejected.returncode == 3 and "API key was rejected" in rejected.stderr
    assert "Traceback" not in rejected.stderr

    assert cli("login", server.url, "--key", key).returncode == 0
    missing = cli("jobs", "show", "999999")
    assert missing.returncode == 3 and "Job 999999 not found (404 not_found)" in missing.stderr


def test_submit_watch_list_show_download(cli, server, key, client, processes, tmp_path) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    assert cli("login", server.url, "--key", key).returncode == 0

    sub = cli("submit", "sleep", "--spec", json.dumps({"seconds": 2, "steps": 4, "metrics": True}))
    assert sub.returncode == 0, sub.stderr
    job_id = submitted_id(sub.stdout)
    watch = cli("jobs", "watch", str(job_id))
    assert watch.returncode == 0, (watch.stdout, watch.stderr, procs.logs())
    assert f"Job {job_id} succeeded" in watch.stdout
    assert "epoch 4 · train_loss 0.25 · val_loss 0.3 · val_rmse 0.5" in watch.stdout
    assert "→ running (attempt 1)" in watch.stdout
    assert "Done: 4 steps in" in watch.stdout and "registered" not in watch.stdout  # the summary fits the kind

    listed = cli("jobs", "list", "--state", "succeeded")
    assert listed.returncode == 0 and re.search(rf"\b{job_id}\s+sleep\b.*succeeded\s+100%", listed.stdout), listed.stdout
    shown = cli("jobs", "show", str(job_id), "--json")
    assert json.loads(shown.stdout)["result"]["steps"] == 4

    out = tmp_path / "result.json"
    dl = cli("download", str(job_id), "-o", str(out))
    assert dl.returncode == 0, dl.stderr
    assert json.loads(out.read_text())["steps"] == 4

    failing = cli("submit", "sleep", "--spec", '{"seconds": 0, "steps": 1, "fail": true}', "--watch")
    assert failing.returncode == 1, failing.stdout
    assert "sleep job asked to fail" in failing.stdout

    invalid = cli("submit", "sleep", "--spec", '{"seconds": -5}')
    assert invalid.returncode == 3 and "Invalid spec for kind 'sleep'" in invalid.stderr
    assert "seconds" in invalid.stderr  # the field-level details are shown


def test_cancel_from_the_cli_ends_a_watch_with_exit_code_2(cli, server, key, client, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    assert cli("login", server.url, "--key", key).returncode == 0
    job = client.submit_job("sleep", {"seconds": 60, "steps": 60})
    wait_until(lambda: client.get_job(job["id"])["state"] == "running", 60, what="job to start")
    watcher = cli.popen("jobs", "watch", str(job["id"]))
    lines: list[str] = []

    def read_output() -> None:
        for line in watcher.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        # Cancel once the watch is following the job (it has printed the replayed "running"
        # transition), not after a fixed pause that a slow start could outlast.
        wait_until(lambda: any("running" in line for line in lines), 60, 0.05, what="the watch to follow the job")
        cancel = cli("jobs", "cancel", str(job["id"]))
        assert cancel.returncode == 0 and "Cancel requested" in cancel.stdout
        watcher.wait(30)
        reader.join(10)
        out, err = "".join(lines), watcher.stderr.read()
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 2, (out, err)
    assert f"Job {job['id']} cancelled" in out
    again = cli("jobs", "cancel", str(job["id"]))
    assert again.returncode == 3 and "already cancelled" in again.stderr


def _library(tmp_path: Path, solubility_csv: Path, n: int = 200) -> Path:
    path = tmp_path / "library.smi"
    with open(solubility_csv) as fh, open(path, "w") as out:
        for i, row in enumerate(csv.DictReader(fh)):
            if i >= n:
                break
            out.write(f"{row['smiles']} mol{i}\n")
        out.write("C1CC broken-ring\n")
    return path


def test_upload_train_score_download_predict(cli, server, key, client, processes, tmp_path) -> None:  # noqa: ANN001
    from app.sample_data import solubility_csv

    procs = processes()
    procs.worker("cpu,gpu")
    procs.worker("inference")
    assert cli("login", server.url, "--key", key).returncode == 0
    data = solubility_csv(tmp_path / "solubility.csv")

    up = cli("datasets", "upload", str(data), "--kind", "sequences", "--name", "sol",
             "--option", "label_columns=solubility", "--json")
    assert up.returncode == 0, up.stderr
    ds = json.loads(up.stdout)
    assert ds["rows"] > 1000 and ds["kind"] == "sequences"
    assert ds["bytes"] == data.stat().st_size  # streamed upload arrived whole
    assert client.get_dataset(ds["id"])["sha256"] == ds["sha256"]

    train = cli("train", "--dataset", str(ds["id"]), "--arch", "rnn", "--task", "regression", "--target",
                "solubility", "--model-name", "cli-sol", "--epochs", "2", "--batch-size", "64", "--lr", "0.003",
                "--param", "hidden_size=32", "--param", "embedding_dim=16", "--watch", timeout=600)
    assert train.returncode == 0, (train.stdout, train.stderr, procs.logs())
    assert "Model cli-sol version 1 registered; test " in train.stdout and "rmse" in train.stdout
    train_id = submitted_id(train.stdout)

    # A train job's result is JSON: a .csv download is refused (exit 3, one line), nothing written.
    wrong = tmp_path / "scores.csv"
    refused = cli("download", str(train_id), "-o", str(wrong))
    assert refused.returncode == 3, (refused.stdout, refused.stderr)
    assert f"job {train_id} is a train job; its result is JSON" in refused.stderr
    assert f"jobs show {train_id}" in refused.stderr and "-o result.json" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not wrong.exists()
    assert re.search(r"epoch 2 · train_loss [\d.]+ · val_loss [\d.]+", train.stdout), train.stdout

    assert cli("models", "alias", "cli-sol", "production", "1").returncode == 0
    models = cli("models", "list")
    assert "cli-sol" in models.stdout and "production→v1" in models.stdout
    weights = tmp_path / "w.safetensors"
    assert cli("models", "download", "cli-sol", "1", "-o", str(weights)).returncode == 0
    assert weights.stat().st_size > 1000

    pred = cli("predict", "cli-sol@production", "CCO", "c1ccccc1", "not_smiles((", "--timeout", "60")
    assert pred.returncode == 0, pred.stderr
    preds = json.loads(pred.stdout)["predictions"]
    assert len(preds) == 3 and "error" in preds[2] and isinstance(preds[0]["value"], float)

    # Slower than --timeout (0): the server answers 202 with the job; the CLI waits for it...
    waited = cli("predict", "cli-sol@production", "CCO", "c1ccccc1", "--timeout", "0")
    assert waited.returncode == 0, (waited.stdout, waited.stderr, procs.logs())
    assert [p["input"] for p in json.loads(waited.stdout)["predictions"]] == ["CCO", "c1ccccc1"]
    # ... or, with --no-wait, says which job and how to fetch its predictions.
    later = cli("predict", "cli-sol@production", "CCO", "--timeout", "0", "--no-wait")
    assert later.returncode == 0, later.stderr
    match = re.search(r"Prediction job (\d+) is (queued|running)", later.stdout)
    assert match and f"download {match.group(1)} -o predictions.json" in later.stdout, later.stdout
    assert client.wait_for(int(match.group(1)), timeout=120)["state"] == "succeeded"
    fetched = tmp_path / "predictions.json"
    assert cli("download", match.group(1), "-o", str(fetched)).returncode == 0
    assert json.loads(fetched.read_text())["predictions"][0]["input"] == "CCO"

    lib_up = cli("datasets", "upload", str(_library(tmp_path, data)), "--kind", "library", "--json")
    assert lib_up.returncode == 0, lib_up.stderr
    library = json.loads(lib_up.stdout)
    scores = tmp_path / "scores.csv"
    scored = cli("score", "cli-sol@production", str(library["id"]), "--top-k", "5", "--watch", "-o", str(scores),
                 timeout=600)
    assert scored.returncode == 0, (scored.stdout, scored.stderr, procs.logs())
    assert re.search(r"Scored 201 rows with cli-sol version 1: \d+ valid, [1-9]\d* invalid", scored.stdout), scored.stdout
    assert f"download {submitted_id(scored.stdout)} -o scores.csv" in scored.stdout
    assert "registered" not in scored.stdout
    with open(scores) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 201  # every library row, the invalid one included with its reason
    assert any("ring" in " ".join(r.values()) for r in rows)
    job_id = submitted_id(scored.stdout)
    parquet = tmp_path / "scores.parquet"
    assert cli("download", str(job_id), "-o", str(parquet), "--format", "parquet").returncode == 0
    assert parquet.read_bytes()[:4] == b"PAR1"


def test_python_client_errors_paging_and_stream(server, key, client, processes) -> None:  # noqa: ANN001
    with pytest.raises(MedmaasError) as bad:
        Client(server.url, "mm_000000000000_nope").list_jobs()
    assert bad.value.status == 401 and bad.value.code == "unauthorized"
    with pytest.raises(MedmaasError) as missing:
        client.get_job(987654)
    assert missing.value.status == 404 and missing.value.code == "not_found"
    with pytest.raises(MedmaasError) as invalid:
        client.submit_job("sleep", {"steps": 0})
    assert invalid.value.status == 422 and "steps" in invalid.value.details["spec"]
    with pytest.raises(MedmaasError) as unknown:
        client.submit_job("no-such-kind", {})
    assert unknown.value.code == "unknown_kind"

    first = client.submit_job("sleep", {"seconds": 0.2, "steps": 2}, idempotency_key="once")
    assert client.submit_job("sleep", {"seconds": 0.2, "steps": 2}, idempotency_key="once")["id"] == first["id"]
    ids = [client.submit_job("sleep", {"seconds": 0, "steps": 1})["id"] for _ in range(4)] + [first["id"]]
    assert sorted(j["id"] for j in client.iter_jobs(page_size=2)) == sorted(ids)

    procs = processes()
    procs.worker()
    events = []
    done = client.wait_for(first["id"], timeout=60, on_event=events.append)
    assert done["state"] == "succeeded"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["to"] for e in events if e["type"] == "state"] == ["queued", "running", "succeeded"]
    assert [e["data"]["progress"] for e in events if e["type"] == "progress"] == [0.5, 1.0]
    for job_id in ids:
        assert client.wait_for(job_id, timeout=60)["state"] == "succeeded"
