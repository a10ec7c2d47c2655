"""The unit suite's guard: unit tests reach no real Redis, PostgreSQL or service process
(tests/unit/conftest.py). Each refusal is recorded and fails the test that caused it, so these
tests clear the record once they have checked it."""
from __future__ import annotations

import socket
import subprocess

import pytest


def refused_once(service_guard: list[str], what: str) -> None:
    assert len(service_guard) == 1, service_guard
    assert what in service_guard[0], service_guard
    service_guard.clear()


@pytest.mark.parametrize("port", [6379, 5432, 1])
def test_tcp_connections_are_refused(service_guard, port: int) -> None:
    with socket.socket() as sock, pytest.raises(AssertionError, match="service-free"):
        sock.connect(("127.0.0.1", port))
    refused_once(service_guard, f"127.0.0.1', {port}")


def test_a_real_redis_client_is_refused(service_guard) -> None:
    import redis

    with pytest.raises(AssertionError, match="service-free"):
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    refused_once(service_guard, "6379")


def test_postgresql_is_refused(service_guard) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    with pytest.raises(AssertionError, match="service-free"), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    engine.dispose()
    refused_once(service_guard, "PostgreSQL")


@pytest.mark.parametrize("argv", [["redis-server", "--port", "0"], ["/usr/lib/postgresql/16/bin/postgres"],
                                  ["python", "-m", "medmaas.cli", "worker"]])
def test_service_processes_are_refused(service_guard, argv: list[str]) -> None:
    with pytest.raises(AssertionError, match="service-free"):
        subprocess.Popen(argv)
    refused_once(service_guard, "spawning")


def test_plain_subprocesses_are_allowed(service_guard) -> None:
    import sys

    out = subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n"
    assert service_guard == []


@pytest.mark.parametrize("fixture", ["redis_url", "pg_url", "pg_settings", "pg_app", "pg_api", "processes"])
def test_service_fixtures_are_refused(request, fixture: str) -> None:
    with pytest.raises(pytest.fail.Exception, match="unit tests are service-free"):
        request.getfixturevalue(fixture)


def test_redis_clients_and_celery_share_one_in_memory_server(fake_redis, broker_url, tmp_path) -> None:
    import redis

    from app.broker import create_celery
    from app.config import from_env

    assert broker_url == fake_redis.url
    client = redis.Redis.from_url(broker_url, socket_timeout=2)
    client.set("k", "v")
    assert fake_redis.client().get("k") == b"v"
    celery = create_celery(from_env({}, home=tmp_path, broker_url=broker_url))
    celery.send_task("medmaas.anything", args=[7], queue="cpu", task_id="t-1")
    assert [(m["task"], m["id"], m["args"]) for m in fake_redis.messages("cpu")] == [("medmaas.anything", "t-1", [7])]
