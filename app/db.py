"""Engine, sessions and the declarative Base shared by the web app and the workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

    from app.notify import Notifier

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# TCP keepalives on PostgreSQL connections: a server that vanished without a FIN (a partition,
# a crashed host) is noticed in about a minute instead of the kernel's two hours.
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def make_engine(url: str, *, idle_in_transaction_s: float | None = None) -> Engine:
    """The engine for `url`. idle_in_transaction_s (PostgreSQL): the server ends a session
    that sits inside a transaction longer than this, releasing its row locks; workers set it
    (to the heartbeat timeout), so one cut off mid-transaction cannot keep its job's row
    locked, and the job from being taken over, for as long as the partition lasts."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            # WAL lets the web server read while a worker writes; the busy timeout makes
            # concurrent writers wait instead of failing with "database is locked".
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    # pool_pre_ping: a connection the server dropped (a restart, a fail-over) is replaced on
    # checkout instead of failing the request or job that draws it; it costs ~45 us a checkout.
    connect_args: dict[str, object] = dict(PG_KEEPALIVES)
    if idle_in_transaction_s:
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={max(1, int(idle_in_transaction_s * 1000))}"
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


class Database:
    """One engine and session factory per process, built from Settings."""

    def __init__(
        self, url: str, notifier: Notifier | None = None, *, idle_in_transaction_s: float | None = None
    ) -> None:
        self.url = url
        self.engine = make_engine(url, idle_in_transaction_s=idle_in_transaction_s)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        if notifier is not None:  # committed job events wake their watchers
            notifier.install(self.sessionmaker)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessionmaker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
