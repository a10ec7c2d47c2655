"""Unit tests are service-free: SQLite for the database and one in-memory fakeredis server
per test for the broker and pub/sub. No redis-server, no PostgreSQL, no worker processes.

How the fake is wired (autouse, so code that builds its own clients is covered too):
- Celery/kombu publishing: kombu's Redis transport builds its connection pool from
  `kombu.transport.redis.Channel.connection_class`; it is swapped for a fakeredis connection
  bound to this test's FakeServer. Messages therefore land in the fake server in kombu's real
  Redis layout (a list per queue, JSON envelopes), exactly what app.dispatch's broker scan
  (reconciling, republishing) reads. kombu's process-wide connection/producer pools are reset
  around each test, so nothing publishes over a connection to an earlier test's server.
- redis-py clients made with `redis.Redis.from_url(...)` (app.notify's Notifier/EventHub,
  /readyz and /metrics, tests' own clients) get a FakeRedis on the same server.

The guard: a unit test that asks for `redis_url`/`pg_url` (or anything built on them:
pg_settings, pg_app, processes), opens a TCP connection, connects to PostgreSQL or spawns a
redis/valkey/PostgreSQL server or a medmaas process fails with a message saying where such a
test belongs (tests/integration).
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from kombu import pools as kombu_pools
from kombu.transport import redis as kombu_redis

# Where unit-test settings point the broker. Nothing listens there: every client is routed to
# the per-test FakeServer, and if one ever escaped the fake, the connect guard below (and port 1
# being closed) make it fail at once instead of touching someone's real Redis.
FAKE_BROKER_URL = "redis://127.0.0.1:1/0"

_SERVICE_BINARIES = ("redis-server", "valkey-server", "valkey", "postgres", "postmaster", "pg_ctl", "initdb")


class FakeBroker:
    """One test's in-memory Redis: the broker, the pub/sub bus and whatever else uses Redis."""

    def __init__(self) -> None:
        self.server = fakeredis.FakeServer()
        self.url = FAKE_BROKER_URL

    def client(self, **kwargs: Any) -> fakeredis.FakeRedis:
        return fakeredis.FakeRedis(server=self.server, **kwargs)

    def messages(self, queue: str) -> list[dict]:
        """The Celery messages waiting in `queue`, oldest first, decoded: each a dict with
        `task`, `id` (the task id), `args` and the raw kombu `envelope`."""
        out = []
        for raw in reversed(self.client().lrange(queue, 0, -1)):  # kombu LPUSHes, workers BRPOP
            envelope = json.loads(raw)
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            body = json.loads(body)
            args = body[0] if isinstance(body, list) else body.get("args")
            out.append({"task": envelope["headers"]["task"], "id": envelope["headers"]["id"], "args": args,
                        "envelope": envelope})
        return out

    def down(self) -> None:
        """Every connection to the broker now fails (as when Redis is down)."""
        self.server.connected = False

    def up(self) -> None:
        self.server.connected = True


@pytest.fixture(autouse=True)
def fake_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBroker]:
    broker = FakeBroker()
    server = broker.server

    class _Connection(fakeredis.FakeRedisConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["server"] = server
            super().__init__(*args, **kwargs)

    def from_url(cls, url: str, **kwargs: Any) -> redis.Redis:
        kwargs.pop("server", None)
        return fakeredis.FakeRedis.from_url(url, server=server, **kwargs)

    monkeypatch.setattr(kombu_redis.Channel, "connection_class", _Connection)
    monkeypatch.setattr(redis.Redis, "from_url", classmethod(from_url))
    # kombu keeps process-wide connection/producer pools keyed by broker URL (Celery publishes
    # through them); every test uses the same URL, so without this a test would publish over a
    # pooled connection to an earlier test's server.
    kombu_pools.reset()
    yield broker
    kombu_pools.reset()


@pytest.fixture
def broker_url(fake_redis: FakeBroker) -> str:
    """Overrides the integration fixture (a real redis-server): unit settings point at the fake."""
    return fake_redis.url


def _refuse(what: str) -> None:
    pytest.fail(f"unit tests are service-free: {what}. Use the fake_redis/broker_url/sqlite_settings fixtures, "
                "or move the test to tests/integration.", pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    _refuse("the `redis_url` fixture starts a real redis-server")
    return ""  # pragma: no cover


@pytest.fixture(scope="session")
def pg_url() -> str:
    _refuse("the `pg_url` fixture (pg_settings, pg_app, pg_api, processes) needs a real PostgreSQL")
    return ""  # pragma: no cover


class ServiceUseError(AssertionError):
    pass


@pytest.fixture(autouse=True)
def service_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse TCP connections, PostgreSQL connections and service processes during unit tests.

    An exception raised here may be swallowed by code that tolerates a down broker, so each
    refusal is also recorded in the list this fixture yields and fails the test at teardown
    (a test of the guard itself clears the list)."""
    refused: list[str] = []

    def refuse(what: str) -> None:
        refused.append(what)
        raise ServiceUseError(f"unit tests are service-free; refused: {what}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse(f"a TCP connection to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        _check(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check(self, address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)

    try:
        import psycopg
    except ImportError:  # pragma: no cover
        psycopg = None
    if psycopg is not None:  # libpq opens its own sockets, out of the socket module's sight
        def pg_connect(*args: Any, **kwargs: Any) -> Any:
            refuse("a PostgreSQL connection")

        monkeypatch.setattr(psycopg, "connect", pg_connect)
        monkeypatch.setattr(psycopg.Connection, "connect", classmethod(lambda cls, *a, **k: pg_connect()))

    real_popen_init = subprocess.Popen.__init__

    def popen_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        words = [os.fsdecode(a) for a in argv]
        if kwargs.get("shell"):
            words = " ".join(words).split()
        program = os.path.basename(words[0]) if words else ""
        if program in _SERVICE_BINARIES or "medmaas.cli" in words or program == "medmaas":
            refuse(f"spawning {' '.join(words)[:200]}")
        real_popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    yield refused
    if refused:
        pytest.fail("unit tests are service-free; this test tried: " + "; ".join(refused), pytrace=False)


@pytest.fixture()
def sqlite_settings(sqlite_settings):  # noqa: ANN001, ANN201
    """Rate limits count in memory here: limits' Redis storage runs Lua scripts, which fakeredis
    runs only with `lupa` (not installed). The integration tests count in a real Redis."""
    return sqlite_settings.replace(rate_limit_storage_url="memory://")
