"""A production-shaped deployment the chaos trials can hurt: a throwaway PostgreSQL database,
a private redis-server (append-only file on, so a restart keeps its data), two `medmaas
worker` processes on the cpu and inference queues and `medmaas beat`, each a subprocess in a
process group of its own (a SIGKILL of the group also takes the worker's RDKit children).

Where network namespaces can be made (root, iproute2: tests/netns.py), the second worker lives
on a "host" of its own: a namespace that reaches PostgreSQL and Redis through forwarders on
its veth link, so that a trial can partition it from either (or cut its link) and restore it.

The web tier is a real `medmaas web` process (gunicorn, one uvicorn worker) that the workload
talks to over HTTP (`WebClient`), hit by the same faults (its pooled connections die with the
database's backends, its broker publishes meet a restarting Redis). The Flask app in this
process only sets the stage (tenants, keys, seeded models) and plays a web tier that cannot
reach the broker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.config import Settings, from_env, to_env
from medmaas.standalone import free_port, wait_for_port
from tests import netns
from tests.conftest import PG_ADMIN_URL, ROOT, _redis_server_binary, throwaway_pg_database

# Quick leases, so a lost worker is noticed in seconds; small shards and batches, so a score
# job of a few hundred rows has several shards to lose.
CHAOS_TIMINGS = {
    "heartbeat_interval_s": 0.5,
    "heartbeat_timeout_s": 5.0,
    "reaper_interval_s": 0.5,
    "requeue_grace_s": 2.0,
}
CHAOS_SETTINGS = {
    **CHAOS_TIMINGS,
    "rate_limit_enabled": False,
    "score_shard_rows": 100,
    "score_batch_size": 50,
    "torch_threads": 1,
    "testing": True,
    "secret_key": "chaos-secret",
}
WORKER_QUEUES = "cpu,inference"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the workers share a small machine


def reaper_bound_s(settings: Settings) -> float:
    """How long a running job of a dead worker may stay `running` before the reaper must have
    re-queued it: the heartbeat timeout plus two reaper ticks."""
    return settings.heartbeat_timeout_s + 2 * settings.reaper_interval_s


def group_states(pgid: int) -> list[str]:
    """The state letter (R, S, Z, ...) of every process in process group pgid (from /proc)."""
    states = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while we looked
        if len(fields) > 2 and int(fields[2]) == pgid:  # fields after "(comm)": state, ppid, pgrp
            states.append(fields[0])
    return states


class Managed:
    """One subprocess in its own process group, restartable under the same name."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_dir: Path, ns: netns.Namespace | None = None
    ) -> None:
        self.name, self.args, self.env, self.log_dir = name, args, env, log_dir
        self.ns = ns  # the network namespace it runs in (None: this machine's)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"{self.name}.{self.starts}.log", "wb")  # noqa: SIM115 (owned by the child)
        self.proc = subprocess.Popen(
            self.ns.command(self.args) if self.ns is not None else self.args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        log.close()

    def signal_group(self, sig: int) -> None:
        """Send sig to the process and every process in its group (the worker's RDKit pool)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def signal(self, sig: int) -> None:
        if self.alive() and self.proc is not None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after timeout."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def group_alive(self) -> bool:
        """Whether a live process of the group is left. Zombies do not count: children of a
        killed worker are re-parented, and whoever reaps them may take a while."""
        if self.proc is None:
            return False
        return any(state != "Z" for state in group_states(self.proc.pid))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal_group(signal.SIGTERM)
        if self.wait(10) is None:
            self.signal_group(signal.SIGKILL)
            self.wait(10)
        self.signal_group(signal.SIGKILL)  # stragglers of the group

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.log_dir.glob(f"{self.name}.*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs[-2:])


class RedisServer(Managed):
    """redis-server on a fixed port with an append-only file: a restart (SIGTERM, start again
    on the same port and directory) keeps the queues and the unacked messages."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        args = [
            _redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(work),
        ]
        super().__init__("redis", args, dict(os.environ), work)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        super().start()
        assert self.proc is not None
        wait_for_port(self.port, 15, self.proc)

    def restart(self, down_s: float) -> None:
        """A clean shutdown (the append-only file is complete), down for down_s, same port."""
        self.signal(signal.SIGTERM)
        if self.wait(15) is None:
            raise AssertionError("redis-server did not stop on SIGTERM")
        time.sleep(down_s)
        self.start()


class WebResponse:
    """A `requests` answer shaped like the Flask test client's (status_code, get_json, headers)."""

    def __init__(self, response: requests.Response) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self.data = response.content
        self._response = response

    def get_json(self) -> Any:
        try:
            return self._response.json()
        except ValueError:
            return None


class WebClient:
    """One tenant's key against the `medmaas web` process, with ApiClient's calling convention
    (tests/conftest.py): json=, data= (a multipart form when it holds (file, name) tuples),
    headers=. Every request has a timeout: a fault must not hang the workload."""

    TIMEOUT_S = 30.0

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url, self.key = base_url.rstrip("/"), key
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def _call(self, method: str, path: str, **kw: Any) -> WebResponse:
        kw.pop("content_type", None)  # requests sets the multipart boundary itself
        data = kw.pop("data", None)
        if isinstance(data, dict) and any(isinstance(v, tuple) for v in data.values()):
            kw["files"] = {k: (v[1], v[0]) for k, v in data.items() if isinstance(v, tuple)}
            data = {k: v for k, v in data.items() if not isinstance(v, tuple)}
        return WebResponse(self.session.request(method, self.base_url + path, data=data, timeout=self.TIMEOUT_S, **kw))

    def get(self, path: str, **kw: Any) -> WebResponse:
        return self._call("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> WebResponse:
        return self._call("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> WebResponse:
        return self._call("PUT", path, **kw)


@dataclass
class Deployment:
    settings: Settings
    work: Path
    redis: RedisServer
    app: Any
    database: Any
    workers: list[Managed] = field(default_factory=list)
    beat: Managed | None = None
    web: Managed | None = None
    web_port: int = 0
    # the namespace of the partitionable worker (workers[1]) and its forwarders; None (with the
    # reason in no_netns) where namespaces cannot be made
    netns: netns.Namespace | None = None
    no_netns: str | None = None
    pg_forward: netns.Forward | None = None
    redis_forward: netns.Forward | None = None

    # -- processes -------------------------------------------------------------------------
    def _medmaas(self, name: str, args: list[str], ns: netns.Namespace | None = None) -> Managed:
        settings = self.settings
        if ns is not None:  # reach PostgreSQL and Redis through the forwarders on the veth link
            assert self.pg_forward is not None
            assert self.redis_forward is not None
            settings = settings.replace(
                database_url=forwarded_url(settings.sqlalchemy_url, self.pg_forward),
                broker_url=forwarded_url(settings.broker_url, self.redis_forward),
            )
        env = {**os.environ, **to_env(settings), **ONE_THREAD}
        return Managed(name, [sys.executable, "-m", "medmaas.cli", *args], env, self.work, ns)

    @property
    def partitionable(self) -> Managed | None:
        """The worker in the network namespace (None without one)."""
        return next((w for w in self.workers if w.ns is not None), None)

    def start(self) -> None:
        self.workers = [
            self._medmaas(f"worker-{i}", ["worker", "--queues", WORKER_QUEUES], self.netns if i == 1 else None)
            for i in range(2)
        ]
        self.beat = self._medmaas("beat", ["beat"])
        self.web_port = free_port()
        self.web = self._medmaas(
            "web", ["web", "--host", "127.0.0.1", "--port", str(self.web_port), "--workers", "1", "--no-access-log"]
        )
        for p in [self.web, *self.workers, self.beat]:
            p.start()
        assert self.web.proc is not None
        wait_for_port(self.web_port, 120, self.web.proc)
        self.wait_workers_ready(timeout=180)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def client(self, key: str) -> WebClient:
        """An API client of the `medmaas web` process for this key."""
        return WebClient(self.web_url, key)

    def live_worker_names(self) -> set[str]:
        from app import workers_registry

        client = redis.Redis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return set(workers_registry.live_workers(client).get("cpu", set()))
        finally:
            client.close()

    def cut_from_postgres(self) -> int:
        """The namespaced worker loses PostgreSQL: its forwarder goes silent (new connections
        and bytes wait unanswered; the connections it had open stay open on the server's side,
        as in a real partition). A transaction cut mid-way keeps its row locks until the
        server's idle-in-transaction timeout (a worker's: its heartbeat timeout, app.db) ends
        it; the reaper skips the locked row meanwhile (trials.FIXED_VIOLATIONS). Returns 0
        (no socket reset)."""
        assert self.pg_forward is not None
        self.pg_forward.hold()
        return 0

    def heal_postgres(self) -> None:
        assert self.pg_forward is not None
        self.pg_forward.release()

    def wait_workers_ready(self, timeout: float) -> None:
        """Until every worker process announced itself on the cpu queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = {str(w.pid) for w in self.workers if w.alive()}
            try:
                announced = {name.rsplit(":", 1)[-1] for name in self.live_worker_names()}
            except redis.RedisError:
                announced = set()
            if pids and pids <= announced and len(pids) == len(self.workers):
                return
            time.sleep(0.2)
        raise AssertionError(f"workers not ready after {timeout}s:\n{self.logs()}")

    def worker_by_pid(self, pid: int) -> Managed | None:
        return next((w for w in self.workers if w.pid == pid and w.alive()), None)

    # -- faults on the database --------------------------------------------------------------
    @property
    def database_name(self) -> str:
        return self.settings.sqlalchemy_url.rsplit("/", 1)[-1]

    def terminate_backends(self) -> int:
        """pg_terminate_backend of every connection to this deployment's database: what its
        clients see of a fail-over (the shared server itself is not restarted)."""
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                return len(
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": self.database_name},
                    ).all()
                )
        finally:
            admin.dispose()

    def processes(self) -> list[Managed]:
        return [*self.workers, *([self.beat] if self.beat else []), *([self.web] if self.web else [])]

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in self.processes())

    def stop(self) -> None:
        for p in self.processes():
            p.stop()


def forwarded_url(url: str, forward: netns.Forward) -> str:
    """url (PostgreSQL or Redis) with its host and port replaced by the forwarder's."""
    return make_url(url).set(host=forward.host, port=forward.port).render_as_string(hide_password=False)


@contextlib.contextmanager
def deployment(work: Path, *, partitionable: bool = True, **overrides: Any) -> Iterator[Deployment]:
    """Bring the whole deployment up (migrated database, redis, workers, beat) and down.
    partitionable: put the second worker in a network namespace where one can be made;
    overrides: settings on top of CHAOS_SETTINGS."""
    from app import create_app
    from app.migrate import upgrade

    work.mkdir(parents=True, exist_ok=True)
    server = RedisServer(work / "redis")
    server.start()
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        url = stack.enter_context(throwaway_pg_database("medmaas_chaos"))
        settings = from_env(
            {}, home=work / "home", database_url=url, broker_url=server.url, **{**CHAOS_SETTINGS, **overrides}
        )
        upgrade(settings)
        app = create_app(settings)
        dep = Deployment(settings, work, server, app, app.extensions["medmaas.db"])
        dep.no_netns = netns.unavailable() if partitionable else "not asked for"
        if dep.no_netns is None:
            dep.netns = stack.enter_context(netns.namespace("chaos"))
            pg = make_url(settings.sqlalchemy_url)
            dep.pg_forward = dep.netns.expose(pg.port or 5432, pg.host or "127.0.0.1")
            dep.redis_forward = dep.netns.expose(server.port)
        try:
            dep.start()
            yield dep
        finally:
            dep.stop()
            from tests.conftest import close_app

            close_app(app)


@contextlib.contextmanager
def small_disk(directory: Path, size_kb: int, free_kb: int) -> Iterator[Path]:
    """Mount a tmpfs of size_kb over `directory` (which must be empty: what was in it is
    hidden) and fill it until about free_kb are left: a disk that is nearly full. Needs root
    (CAP_SYS_ADMIN); raises PermissionError otherwise. Unmounted (lazily) on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        stat = os.statvfs(directory)
        filler = max(0, stat.f_bavail * stat.f_frsize - free_kb * 1024)
        with open(directory / ".filler", "wb") as fh:
            fh.write(b"\0" * filler)
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
