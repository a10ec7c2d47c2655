"""A worker's engine on PostgreSQL pings only connections that sat idle (app.db.ping_after_idle),
and Database.run does work again on a fresh connection when the server dropped the one it drew:
what a worker sees of a fail-over (pg_terminate_backend of its connections)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text

from app.db import Database

pytestmark = pytest.mark.integration


def terminate(url: str, pids: set[int]) -> None:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()


def backend_pid(db: Database) -> int:
    with db.session() as s:
        return int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())


@pytest.fixture()
def db(pg_settings):  # noqa: ANN001, ANN201
    database = Database(pg_settings.sqlalchemy_url, ping_after_idle_s=0.3)
    yield database
    database.dispose()


def test_a_connection_used_moments_ago_is_not_pinged_and_one_that_sat_idle_is(db: Database) -> None:
    pings = []
    real_ping = db.engine.dialect.do_ping

    def counting_ping(conn):  # noqa: ANN001, ANN202
        pings.append(1)
        return real_ping(conn)

    db.engine.dialect.do_ping = counting_ping  # type: ignore[method-assign]
    backend_pid(db)  # a new connection: not pinged
    backend_pid(db)  # used moments ago: not pinged
    assert pings == []
    time.sleep(0.4)
    backend_pid(db)
    assert pings == [1]


def test_work_whose_connection_the_server_dropped_is_done_again_on_a_new_one(db: Database) -> None:
    first = backend_pid(db)
    terminate(db.url, {first})  # the pooled connection is dead; used moments ago, it is not pinged
    calls = []

    def work(s):  # noqa: ANN001, ANN202
        calls.append(1)
        return int(s.execute(text("SELECT pg_backend_pid()")).scalar_one())

    second = db.run(work)
    assert second != first and len(calls) == 2  # the first try failed on the dead connection


def test_a_connection_dropped_while_it_sat_idle_is_replaced_by_its_ping(db: Database) -> None:
    first = backend_pid(db)
    terminate(db.url, {first})
    time.sleep(0.4)
    with db.session() as s:  # no retry needed: the ping found the connection dead
        assert int(s.execute(text("SELECT pg_backend_pid()")).scalar_one()) != first


def test_one_statement_work_runs_without_begin_and_commit(db: Database) -> None:
    assert db.run(lambda s: s.execute(text("SELECT now() = statement_timestamp()")).scalar_one(), one_statement=True)
    # inside a transaction now() is the transaction's start, earlier than a later statement's
    assert not db.run(
        lambda s: (s.execute(text("SELECT pg_sleep(0.01)")), s.execute(text("SELECT now() = statement_timestamp()")))[
            1
        ].scalar_one()
    )
