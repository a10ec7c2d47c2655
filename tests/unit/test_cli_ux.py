"""What a new user meets on the command line, service-free: the standalone port check and
start-up failures, `jobs watch` summaries per kind, `download` refusing a result in the wrong
format, `predict` following a 202 job, the demo's predictions table and the install script's
last words. HTTP goes to a fake requests session; nothing listens or connects."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from rich.console import Console

from app.config import from_env
from medmaas import commands
from medmaas.client import Client, MedmaasError
from medmaas.demo import predictions_table
from medmaas.standalone import Children, StartupError, check_web_port, run_standalone, wait_for_web

ROOT = Path(__file__).resolve().parents[2]


# -- standalone: the port, start-up failures ---------------------------------------------------


@pytest.fixture
def busy_port() -> Any:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_busy_web_port_is_refused_before_anything_starts(busy_port: int, tmp_path: Path, capsys) -> None:
    message = check_web_port("127.0.0.1", busy_port)
    assert message is not None
    assert message.startswith(f"port {busy_port} on 127.0.0.1 is in use (another medmaas standalone?)")
    suggested = int(re.search(r"standalone --port (\d+)$", message).group(1))  # type: ignore[union-attr]
    assert suggested != busy_port
    assert check_web_port("127.0.0.1", suggested) is None

    home = tmp_path / "home"
    code = run_standalone(from_env({}, home=home, web_port=busy_port))
    out = capsys.readouterr()
    assert code == 1
    assert f"port {busy_port} on 127.0.0.1 is in use" in out.err
    assert "--port" in out.err
    assert "running at" not in out.out + out.err
    assert "API key" not in out.out + out.err
    assert not home.exists()  # nothing was created, let alone started


def _children(tmp_path: Path) -> Children:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return Children(tmp_path / "logs")


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_web_child_that_dies_during_start_up_is_an_error_with_its_last_log_lines(tmp_path: Path) -> None:
    children = _children(tmp_path)
    proc = children.start("the web server", "web.log", _py("import sys; print('booting'); sys.exit('boom: no app')"))
    proc.wait(30)  # (the port is never tried: unit tests connect nowhere)
    with pytest.raises(StartupError) as failed:
        wait_for_web(children, proc, 1, 30, threading.Event())
    text = str(failed.value)
    assert text.startswith("the web server exited during start-up (exit code 1); last lines of ")
    assert "web.log" in text
    assert "  | booting" in text
    assert "  | boom: no app" in text
    children.stop_all()


def test_gunicorn_saying_connection_in_use_fails_at_once_and_old_runs_logs_do_not_count(tmp_path: Path) -> None:
    children = _children(tmp_path)
    # An earlier run's failure in the same (appended) log must not fail this one.
    (tmp_path / "logs" / "web.log").write_text("[ERROR] Connection in use: ('127.0.0.1', 5000)\n")
    old = children.start("the web server", "web.log", _py("import time; time.sleep(30)"))
    assert "Connection in use" not in children.output(old)
    children.stop_all(2)

    children = _children(tmp_path)
    busy = children.start(
        "the web server",
        "web.log",
        _py("import time; print('[ERROR] Connection in use: (127.0.0.1, 5000)', flush=True); time.sleep(30)"),
    )
    deadline = time.monotonic() + 30
    while "Connection in use" not in children.output(busy) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(StartupError, match=r"could not listen on port 5000 \(in use\)"):
        wait_for_web(children, busy, 5000, 30, threading.Event())
    children.stop_all(2)


def test_a_dead_child_is_found_with_its_log(tmp_path: Path) -> None:
    children = _children(tmp_path)
    alive = children.start("the inference worker", "worker-inference.log", _py("import time; time.sleep(30)"))
    dead = children.start("the training/scoring worker", "worker-cpu.log", _py("raise SystemExit(3)"))
    dead.wait(10)
    assert children.dead() is dead
    assert alive.poll() is None
    assert "the training/scoring worker exited (exit code 3)" in str(children.failure(dead))
    children.stop_all(2)
    assert alive.poll() is not None


# -- a fake server for the client commands -----------------------------------------------------


Handler = Callable[[str, str, dict], tuple[int, dict[str, str], bytes]]


class FakeSession(requests.Session):
    """A requests.Session whose answers come from handler(method, path, params)."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.calls: list[tuple[str, str, dict]] = []

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        path = url.split("://", 1)[1].split("/", 1)[1]
        params = kwargs.get("params") or {}
        self.calls.append((method, "/" + path, params))
        status, headers, body = self.handler(method, "/" + path, params)
        resp = requests.Response()
        resp.status_code, resp.url, resp._content = status, url, body
        resp.headers.update(headers)
        resp.raw = io.BytesIO(body)
        return resp


def _json(status: int, data: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(data).encode()


JOBS = {
    4: {"id": 4, "kind": "train", "state": "succeeded", "result": {"model": "sol", "version": 1}},
    5: {"id": 5, "kind": "score", "state": "succeeded", "spec": {"output": "parquet"}},
}


def api(method: str, path: str, params: dict) -> tuple[int, dict[str, str], bytes]:
    if m := re.fullmatch(r"/api/v1/jobs/(\d+)", path):
        return _json(200, JOBS[int(m.group(1))])
    if m := re.fullmatch(r"/api/v1/jobs/(\d+)/result", path):
        job = JOBS[int(m.group(1))]
        fmt = params.get("format") or (job.get("spec") or {}).get("output")
        if job["kind"] != "score" or fmt == "json":
            return _json(200, job.get("result") or {"rows": 2})
        if fmt == "csv":
            return 200, {"Content-Type": "text/csv", "Content-Disposition": 'attachment; filename="s.csv"'}, b"a\n1\n"
        return 200, {"Content-Type": "application/vnd.apache.parquet"}, b"PAR1....PAR1"
    return _json(404, {"error": {"code": "not_found", "message": f"no route {path}", "details": None}})


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], FakeSession]:
    def install(handler: Handler) -> FakeSession:
        session = FakeSession(handler)
        monkeypatch.setattr(commands, "get_client", lambda: Client("http://medmaas.test", "mm_k", session=session))
        return session

    return install


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(commands.client, list(args), catch_exceptions=False)


# -- download ------------------------------------------------------------------------------------


def test_download_refuses_a_json_result_for_a_csv_file_and_writes_nothing(fake_api, tmp_path: Path) -> None:
    fake_api(api)
    target = tmp_path / "scores.csv"
    res = run_cli("download", "4", "-o", str(target))
    assert res.exit_code == 3, res.output
    assert "job 4 is a train job; its result is JSON" in res.output
    assert "medmaas jobs show 4" in res.output
    assert "-o result.json" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not target.exists()
    assert not list(tmp_path.iterdir())

    ok = run_cli("download", "4", "-o", str(tmp_path / "result.json"))
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "result.json").read_text()) == {"model": "sol", "version": 1}


def test_download_asks_the_server_for_the_format_the_file_name_names(fake_api, tmp_path: Path) -> None:
    session = fake_api(api)
    ok = run_cli("download", "5", "-o", str(tmp_path / "scores.csv"))  # the job wrote parquet
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "scores.csv").read_text() == "a\n1\n"
    assert session.calls[-1][2] == {"format": "csv"}
    assert run_cli("download", "5", "-o", str(tmp_path / "s.parquet")).exit_code == 0
    assert (tmp_path / "s.parquet").read_bytes().startswith(b"PAR1")

    clash = run_cli("download", "5", "-o", str(tmp_path / "x.csv"), "--format", "parquet")
    assert clash.exit_code == 2
    assert "names a csv file" in clash.output
    assert not (tmp_path / "x.csv").exists()


def test_client_never_saves_a_file_that_contradicts_its_extension(tmp_path: Path) -> None:
    def wrong(method: str, path: str, params: dict) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "text/csv"}, b"a\n1\n"

    with Client("http://medmaas.test", "k", session=FakeSession(wrong)) as c, pytest.raises(MedmaasError) as err:
        c.download_result(9, tmp_path / "out.parquet")
    assert err.value.code == "format_mismatch"
    assert err.value.details == {"wanted": "parquet", "got": "csv"}
    assert not list(tmp_path.iterdir())


# -- predict: 200, or 202 with the job -----------------------------------------------------------

PREDICTIONS = {"model": "sol", "version": 1, "outputs": ["y"], "predictions": [{"input": "CCO", "value": 0.5}]}


def predict_api(body: dict, location: str | None = "/api/v1/jobs/7") -> Handler:
    states = iter(["running", "succeeded"])

    def handler(method: str, path: str, params: dict) -> tuple[int, dict[str, str], bytes]:
        if path.endswith("/predict"):
            return _json(202, body, **({"Location": location} if location else {}))
        if path == "/api/v1/jobs/7/stream":
            return 200, {"Content-Type": "text/event-stream"}, b"event: end\ndata: {}\n\n"
        if path == "/api/v1/jobs/7":
            state = next(states, "succeeded")
            return _json(200, {"id": 7, "kind": "predict", "state": state, "result": PREDICTIONS, "error": None})
        return _json(404, {"error": {"code": "not_found", "message": path}})

    return handler


def test_predict_that_outlives_its_timeout_waits_for_the_job_and_prints_predictions(fake_api) -> None:
    fake_api(predict_api({"id": 7, "state": "queued", "kind": "predict"}))
    res = run_cli("predict", "sol", "CCO", "--timeout", "0")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert json.loads(out[out.index("{") :])["predictions"] == PREDICTIONS["predictions"]


def test_predict_no_wait_prints_the_job_and_how_to_fetch_it(fake_api) -> None:
    fake_api(predict_api({"state": "queued"}))  # the id only in the Location header
    res = run_cli("predict", "sol", "CCO", "--timeout", "0", "--no-wait")
    assert res.exit_code == 0, res.output
    assert "Prediction job 7 is queued" in res.output
    assert "jobs watch 7" in res.output
    assert "download 7 -o predictions.json" in res.output


def test_predict_202_without_a_job_is_an_error_not_an_empty_success(fake_api) -> None:
    fake_api(predict_api({}, location=None))
    res = run_cli("predict", "sol", "CCO", "--timeout", "0")
    assert res.exit_code == 3
    assert "did not say which job" in res.output
    assert "{}" not in res.output


# -- jobs watch: the last lines fit the kind ---------------------------------------------------


def test_watch_summaries_fit_the_job_kind() -> None:
    train = {
        "id": 2,
        "kind": "train",
        "result": {"model": "sol", "version": 1, "metrics": {"test": {"rmse": 0.91234, "r2": 0.8}}},
    }
    assert commands.result_summary(train)[0] == "Model sol version 1 registered; test r2 0.8 · rmse 0.9123"
    score = {
        "id": 3,
        "kind": "score",
        "result": {"model": "sol", "version": 1, "rows": 201, "valid": 200, "invalid": 1, "format": "parquet"},
    }
    lines = commands.result_summary(score)
    assert lines[0] == "Scored 201 rows with sol version 1: 200 valid, 1 invalid"
    assert lines[-1].endswith("download 3 -o scores.parquet")
    assert not any("registered" in x for x in lines)
    predict = {"id": 4, "kind": "predict", "result": {"model": "sol", "version": 1, "predictions": [{}, {}, {}]}}
    lines = commands.result_summary(predict)
    assert lines[0] == "3 predictions from sol version 1"
    assert not any("registered" in x for x in lines)
    sleep = {"id": 5, "kind": "sleep", "result": {"slept_s": 2.0, "steps": 4}}
    assert commands.result_summary(sleep) == ["Done: 4 steps in 2s"]


# -- messages name a command that runs -----------------------------------------------------------


def test_messages_name_the_medmaas_command_as_it_can_be_run(monkeypatch: pytest.MonkeyPatch) -> None:
    venv_script = Path(sys.executable).parent / "medmaas"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # .venv not activated
    name = commands.command_name()
    if venv_script.exists():
        assert Path(name).resolve() == venv_script.resolve()
        assert name.endswith("medmaas")
    monkeypatch.setenv("PATH", f"{venv_script.parent}:/usr/bin:/bin")
    assert commands.command_name() == "medmaas"

    monkeypatch.delenv("MEDMAAS_URL", raising=False)
    monkeypatch.setenv("MEDMAAS_CLIENT_CONFIG", "/nonexistent/medmaas.json")
    res = CliRunner().invoke(commands.client, ["jobs", "list"])
    assert res.exit_code == 3
    assert "medmaas login URL --key KEY" in res.output
    assert '--key "$(cat .medmaas/api_key)"' in res.output


# -- the demo's predictions table ------------------------------------------------------------------


def test_the_predictions_table_wraps_long_errors_instead_of_cutting_them() -> None:
    error = (
        "not-a-molecule is not a valid SMILES for model solubility-demo v1: "
        "RDKit could not parse it (SMILES Parse Error: syntax error while parsing)"
    )
    rows = [{"input": "CCO", "smiles": "CCO", "value": 0.1234}, {"input": "not-a-molecule", "error": error}]
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(predictions_table(rows))
    text = out.getvalue()
    assert "0.12" in text
    assert "…" not in text
    notes = [line.split("│")[-2] for line in text.splitlines() if line.count("│") >= 5]
    assert "".join(notes).replace(" ", "") == error.replace(" ", "")


# -- scripts/install.sh says how to run what it installed -------------------------------------------


def _install_epilogue(tmp_path: Path, path_has_venv: bool) -> str:
    script = (ROOT / "scripts" / "install.sh").read_text()
    tail = script[script.index('echo "MedMaaS installed in') :].replace(
        "$(.venv/bin/python -c 'import torch; print(\"torch\", torch.__version__)')", "torch x"
    )
    bindir = tmp_path / ".venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "medmaas").write_text("#!/bin/sh\n")
    (bindir / "medmaas").chmod(0o755)
    path = f"{bindir}:/usr/bin:/bin" if path_has_venv else "/usr/bin:/bin"
    env = {"PATH": path, "HOME": str(tmp_path)}
    done = subprocess.run(["/bin/bash", "-c", tail], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_install_script_ends_by_saying_how_to_run_medmaas(tmp_path: Path) -> None:
    out = _install_epilogue(tmp_path / "a", path_has_venv=False)
    venv = tmp_path / "a" / ".venv"
    assert f"source {venv}/bin/activate" in out
    assert f"{venv}/bin/medmaas standalone --demo" in out
    assert "not on your PATH" in out
    out = _install_epilogue(tmp_path / "b", path_has_venv=True)
    assert "Run it:  medmaas standalone --demo" in out
    assert "activate" not in out
