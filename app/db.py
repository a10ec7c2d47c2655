"""Engine, sessions and the declarative Base shared by the web app and the workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

    from app.notify import Notifier

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def make_engine(
    url: str, *, idle_in_transaction_s: float | None = None, ping_after_idle_s: float | None = None
) -> Engine:
    """The engine for `url`. idle_in_transaction_s (PostgreSQL): the server ends a session
    that sits inside a transaction longer than this, releasing its row locks; workers set it
    (to the heartbeat timeout), so one cut off mid-transaction cannot keep its job's row
    locked, and the job from being taken over, for as long as the partition lasts.
    ping_after_idle_s (PostgreSQL): ping only connections that sat in the pool that long
    (`ping_after_idle`) instead of on every checkout."""
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
    # checkout instead of failing the request or job that draws it; it costs a round trip.
    connect_args: dict[str, object] = dict(PG_KEEPALIVES)
    if idle_in_transaction_s:
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={max(1, int(idle_in_transaction_s * 1000))}"
    engine = create_engine(
        url, pool_pre_ping=ping_after_idle_s is None, pool_size=10, max_overflow=20, connect_args=connect_args
    )
    if ping_after_idle_s is not None:
        ping_after_idle(engine, ping_after_idle_s)
    return engine


_IDLE_SINCE = "medmaas.idle_since"


def ping_after_idle(engine: Engine, idle_s: float) -> None:
    """pool_pre_ping, for connections that sat in the pool at least idle_s only: a dead one is
    replaced on checkout (the pool draws another). One used moments ago is handed out
    unpinged, a round trip saved on every transaction of a busy worker; should the server
    have dropped it meanwhile, its first statement fails as a disconnect, the pool discards
    every connection of that age, and `Database.run` does the work again on a fresh one."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: DBAPIConnection, record: ConnectionPoolEntry, _proxy: object) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < idle_s:  # new, or used moments ago
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise DisconnectionError("the connection failed its ping") from exc


class Database:
    """One engine and session factory per process, built from Settings."""

    def __init__(
        self,
        url: str,
        notifier: Notifier | None = None,
        *,
        idle_in_transaction_s: float | None = None,
        ping_after_idle_s: float | None = None,
    ) -> None:
        self.url = url
        self.engine = make_engine(url, idle_in_transaction_s=idle_in_transaction_s, ping_after_idle_s=ping_after_idle_s)
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

    def run(self, work: Callable[[Session], T], *, one_statement: bool = False) -> T:
        """`work(session)` in a transaction of its own (`session`), done once more on a fresh
        connection when the first try found its connection dead (`ping_after_idle`); work that
        may be repeated, such as a compare-and-set. one_statement: each statement `work` sends
        is a transaction of its own on PostgreSQL (autocommit: no BEGIN and COMMIT round trips),
        for work of one statement, or of statements that need not commit together."""
        for retry in (True, False):
            try:
                with self.session() as session:
                    if one_statement and self.engine.dialect.name == "postgresql":
                        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                    return work(session)
            except DBAPIError as exc:
                if not (retry and exc.connection_invalidated):
                    raise
                log.warning("the database connection was lost; trying once more on a new one")
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()
