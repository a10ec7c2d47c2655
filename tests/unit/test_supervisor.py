"""Standalone supervision, service-free: the restart backoff policy, and the Supervisor
restarting real (tiny Python) children, giving up on one that keeps exiting or whose port
was taken, and clearing what a dead child left in its process group."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from medmaas.standalone import Backoff, Supervisor, describe_exit


def test_backoff_doubles_from_one_second_to_thirty() -> None:
    b = Backoff(max_exits=100, window=1e9)
    delays = [b.after_exit(started=t, now=t + 0.5) for t in range(0, 80, 10)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_resets_after_a_run_that_stayed_up_a_minute() -> None:
    b = Backoff(max_exits=100, window=1e9)
    assert [b.after_exit(0, 1), b.after_exit(2, 3), b.after_exit(5, 6)] == [1, 2, 4]
    assert b.after_exit(started=10, now=10 + 59.9) == 8  # not quite a minute: keeps growing
    assert b.after_exit(started=100, now=160) == 1  # up for a minute: back to the start
    assert b.after_exit(started=161, now=162) == 2


def test_backoff_gives_up_on_too_many_exits_within_the_window() -> None:
    b = Backoff(max_exits=5, window=120)
    now = 0.0
    for expected in (1, 2, 4, 8, 16):
        assert b.after_exit(now, now + 1) == expected
        now += 1 + expected
    assert b.after_exit(now, now + 1) is None  # the sixth exit within two minutes
    assert b.exits == 6


def test_backoff_forgets_exits_older_than_the_window() -> None:
    b = Backoff(max_exits=2, window=100, stable_after=1e9)
    assert b.after_exit(0, 1) == 1
    assert b.after_exit(2, 3) == 2
    assert b.after_exit(200, 250) == 4  # the first two are out of the window (not up a minute: no reset)
    assert b.exits == 1


def test_describe_exit() -> None:
    assert describe_exit(-9) == "signal 9"
    assert describe_exit(3) == "exit code 3"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _supervisor(tmp_path: Path, lines: list[str], **backoff: float) -> Supervisor:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return Supervisor(tmp_path / "logs", backoff=lambda: Backoff(**backoff), echo=lines.append)  # type: ignore[arg-type]


def _check_until(sup: Supervisor, done: Callable[[], bool], timeout: float = 20) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        problem = sup.check()
        if problem is not None or done():
            return problem
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_killed_child_is_restarted_and_the_others_keep_running(tmp_path: Path) -> None:
    lines: list[str] = []
    sup = _supervisor(tmp_path, lines, initial=0.2)
    web = sup.start("the web server", "web.log", _py("import time; time.sleep(60)"))
    worker = sup.start("the training/scoring worker", "worker-cpu.log", _py("import time; time.sleep(60)"))
    try:
        assert sup.check() is None
        worker.kill()
        worker.wait(10)
        assert _check_until(sup, lambda: sup.watched[1].proc is not worker) is None
        assert lines == ["worker-cpu exited (signal 9); restarting in 0.2 s"]
        new = sup.watched[1].proc
        assert new.poll() is None
        assert web.poll() is None
        assert sup.watched[0].proc is web
        assert [p for _, p, _ in sup.procs] == [web, new]  # the dead one is forgotten
        log = (tmp_path / "logs" / "worker-cpu.log").read_text()
        assert "worker-cpu exited (signal 9); restarting in 0.2 s" in log
        assert log.count("medmaas standalone starts the training/scoring worker") == 2
    finally:
        sup.stop_all(2)
    assert all(p.poll() is not None for _, p, _ in sup.procs)


def test_a_child_that_keeps_exiting_is_given_up_on_with_its_last_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    sup = _supervisor(tmp_path, lines, initial=0.01, max_exits=3, window=60)
    sup.start("the inference worker", "worker-inference.log", _py("print('cannot start'); raise SystemExit(2)"))
    problem = _check_until(sup, lambda: False)
    assert problem is not None
    assert problem.startswith(
        "the inference worker exited 4 times within 60 s; giving up. It last exited (exit code 2)"
    )
    assert "  | cannot start" in problem
    assert lines == [f"worker-inference exited (exit code 2); restarting in {d:g} s" for d in (0.01, 0.02, 0.04)]
    sup.stop_all(2)


def test_a_port_taken_by_another_program_is_not_retried(tmp_path: Path) -> None:
    lines: list[str] = []
    sup = _supervisor(tmp_path, lines, initial=0.01)
    sup.start("the web server", "web.log", _py("print('[ERROR] Connection in use: (127.0.0.1, 5000)'); exit(1)"))
    problem = _check_until(sup, lambda: False)
    assert problem is not None
    assert "the web server cannot listen on its port again: another program took it" in problem
    assert lines == []
    sup.stop_all(2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_what_a_dead_child_leaves_in_its_group_is_killed_with_it(tmp_path: Path) -> None:
    # like gunicorn's workers, which would keep the web port after their master was killed
    lines: list[str] = []
    sup = _supervisor(tmp_path, lines, initial=30)
    leader = sup.start(
        "the web server",
        "web.log",
        _py(
            "import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(p.pid, flush=True); time.sleep(60)"
        ),
    )
    log = tmp_path / "logs" / "web.log"
    deadline = time.monotonic() + 20
    while not sup.output(leader).strip() and time.monotonic() < deadline:
        time.sleep(0.02)
    orphan = int(sup.output(leader).strip().splitlines()[-1])
    assert os.getpgid(orphan) == leader.pid
    leader.send_signal(signal.SIGKILL)
    leader.wait(10)
    assert _alive(orphan)
    assert sup.check() is None  # notices the exit, clears the group, schedules a restart in 30 s
    deadline = time.monotonic() + 10
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(orphan)
    assert lines == ["web exited (signal 9); restarting in 30 s"]
    assert "restarting in 30 s" in log.read_text()
    sup.stop_all(2)


def test_stop_all_stops_restarted_children_too(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, [], initial=0.01)
    first = sup.start("the broker (valkey-server)", "valkey.log", _py("import time; time.sleep(60)"))
    first.kill()
    first.wait(10)
    _check_until(sup, lambda: sup.watched[0].proc is not first and sup.watched[0].proc.poll() is None)
    second = sup.watched[0].proc
    sup.stop_all(2)
    assert second.poll() is not None
