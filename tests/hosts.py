"""Worker "hosts" on this machine, for tests and benchmarks: each is a `medmaas worker` that
sees what a second machine with no shared filesystem would see.

- its own network namespace (tests/netns.py): PostgreSQL, Redis and the S3 endpoint of this
  machine (all on 127.0.0.1) reach it only through forwarders on its veth link;
- its own hostname (a UTS namespace), so its worker name is `host-<label>:<pid>`;
- its own empty home on a private tmpfs (artifact cache and scratch, temporary files): the
  mount lives in the worker's mount namespace (`ip netns exec` makes one), so no other
  process sees a byte of it, and it is gone when the worker's last process ends.

    with worker_host("a", settings, work) as host:  # settings: an s3:// store and its endpoint
        host.name, host.pid                          # "host-a", the worker's pid
        host.kill()                                  # SIGKILL the worker and its RDKit children

Needs root, iproute2 and util-linux (`unshare`, `mount`); `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import redis

from app.config import Settings, to_env
from tests import netns
from tests.chaos.deployment import Managed, forwarded_url

# Inside the namespace: name the host, put a private tmpfs over its (empty) home, then become
# the worker (exec: the pid Popen knows is the worker's). $1 hostname, $2 home, then the command.
HOST_SCRIPT = (
    'hostname "$1" && mount -t tmpfs -o mode=0700 medmaas-host "$2" && mkdir -p "$2/tmp" && shift 2 && exec "$@"'
)


def unavailable() -> str | None:
    """Why worker hosts cannot be made here, or None when they can."""
    for tool in ("unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return f"util-linux's `{tool}` is not installed"
    return netns.unavailable()


class WorkerHost:
    """One worker host (see the module's docstring). `settings` are the control plane's: direct
    127.0.0.1 URLs for PostgreSQL and Redis, and an s3:// artifact store with its endpoint."""

    def __init__(
        self,
        label: str,
        settings: Settings,
        work: Path,
        *,
        queues: str = "cpu",
        env: dict[str, str] | None = None,
    ) -> None:
        if not settings.artifact_store.startswith("s3://") or not settings.s3_endpoint_url:
            raise ValueError("a worker host shares nothing with this machine but an s3:// store and its endpoint")
        self.name = f"host-{label}"
        self.settings, self.queues, self.extra_env = settings, queues, dict(env or {})
        self.work = work
        self.home = work / self.name  # empty here: the worker sees its private tmpfs there
        self.ns = netns.Namespace(label)
        self.worker: Managed | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> WorkerHost:
        self.home.mkdir(parents=True, exist_ok=False)
        self.ns.create()
        try:
            pg = urlparse(self.settings.sqlalchemy_url.replace("+psycopg", ""))
            pg_forward = self.ns.expose(pg.port or 5432, pg.hostname or "127.0.0.1")
            broker = urlparse(self.settings.broker_url)
            redis_forward = self.ns.expose(broker.port or 6379, broker.hostname or "127.0.0.1")
            s3 = urlparse(self.settings.s3_endpoint_url)
            s3_forward = self.ns.expose(s3.port or 80, s3.hostname or "127.0.0.1")
            mine = self.settings.replace(
                database_url=forwarded_url(self.settings.sqlalchemy_url, pg_forward),
                broker_url=forwarded_url(self.settings.broker_url, redis_forward),
                s3_endpoint_url=f"{s3.scheme}://{s3_forward.address}",
                home=self.home,
                artifact_root=str(self.home / "artifacts"),
            )
            env = {**os.environ, **to_env(mine), "TMPDIR": str(self.home / "tmp"), **self.extra_env}
            command = [sys.executable, "-m", "medmaas.cli", "worker", "--queues", self.queues]
            args = ["unshare", "--uts", "sh", "-c", HOST_SCRIPT, "sh", self.name, str(self.home), *command]
            self.worker = Managed(self.name, args, env, self.work, self.ns)
            self.worker.start()
        except BaseException:
            self.ns.delete()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.worker is not None
        assert self.worker.pid is not None
        return self.worker.pid

    @property
    def worker_name(self) -> str:
        return f"{self.name}:{self.pid}"

    def alive(self) -> bool:
        return self.worker is not None and self.worker.alive()

    def kill(self) -> None:
        """SIGKILL the worker and every process of its group (its RDKit pool), as a host that
        loses power; returns once they are gone."""
        assert self.worker is not None
        self.worker.signal_group(signal.SIGKILL)
        self.worker.wait(30)
        deadline = time.monotonic() + 30
        while self.worker.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        return self.worker.log_tail(chars) if self.worker is not None else ""

    def stop(self) -> None:
        try:
            if self.worker is not None:
                self.worker.stop()
        finally:
            self.ns.delete()


def wait_ready(hosts: list[WorkerHost], broker_url: str, timeout: float = 180.0) -> None:
    """Until every host's worker announced itself on its queues (app/workers_registry.py)."""
    from app import workers_registry

    client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for h in hosts:
                if not h.alive():
                    raise AssertionError(f"{h.name}'s worker exited:\n{h.log_tail()}")
            with contextlib.suppress(redis.RedisError):
                live = workers_registry.live_workers(client)
                names = set().union(*live.values()) if live else set()
                if all(h.worker_name in names for h in hosts):
                    return
            time.sleep(0.2)
    finally:
        client.close()
    logs = "\n".join(h.log_tail() for h in hosts)
    raise AssertionError(f"worker hosts not ready after {timeout}s:\n{logs}")


@contextlib.contextmanager
def worker_hosts(labels: list[str], settings: Settings, work: Path, **kwargs: object) -> Iterator[list[WorkerHost]]:
    """Start a worker host per label (see WorkerHost), wait until all are ready, stop them on exit."""
    started: list[WorkerHost] = []
    try:
        for label in labels:
            started.append(WorkerHost(label, settings, work, **kwargs).start())  # type: ignore[arg-type]
        wait_ready(started, settings.broker_url)
        yield started
    finally:
        for h in started:
            h.stop()
