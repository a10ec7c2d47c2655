"""The audit trail: who read or changed what, appended in the same transaction as the action.

Each tenant's rows form a hash chain: a row's `hash` is the sha256 of a canonical JSON text
of its fields, `prev_hash` included, so editing or deleting a row by hand breaks the chain at
that row (`verify`). Chaining serialises per tenant on the tenant's `audit_heads` row (an
UPDATE ... RETURNING or SELECT ... FOR UPDATE takes its row lock until the transaction
ends), so concurrent requests never fork the chain.

Requests append their rows unsealed (`append_unsealed`: one INSERT, no lock; seq,
prev_hash and hash NULL): a write's in its action's transaction, a read's (or a refusal's,
a failure's) before its response leaves. The sealer (`seal`) chains unsealed rows in id
order, in batches, under the head lock: the maintenance tick runs it, `verify` and the
exports run it first (so they prove the whole trail), and a web process seals a tenant
inline, after the response, once it has appended SEAL_AFTER rows for it since its last
seal. Until sealed (about one maintenance tick), a row is written but not yet protected by
the chain. `record` (the CLI's entries) chains at once.

Requests record through the session: `attach(session, entry)` puts an Entry on the session,
and the hooks `install` adds to a sessionmaker append it in the next commit of that session
(after flushing, so the ids of rows the action created are known). A rolled-back action
therefore leaves no row, and a committed one always has its row.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, event, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from app.models import ApiKey, AuditEvent, AuditHead, Dataset, Job, ModelVersion, Tenant, utcnow

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the prev_hash of a tenant's first row

# The fields a row's hash covers, in the canonical text (its `id` is not: ids are the
# database's; `seq` orders the chain).
HASHED_FIELDS = (
    "tenant_id",
    "seq",
    "ts",
    "actor",
    "via",
    "key_id",
    "key_prefix",
    "action",
    "object_type",
    "object_id",
    "outcome",
    "status",
    "client_addr",
    "request_id",
    "details",
    "prev_hash",
)

# Rows an action creates, named as audit object types: a request that creates one records
# its id (the created object of the action's type becomes the row's object).
CREATED_TYPES: dict[type, str] = {Job: "job", Dataset: "dataset", ApiKey: "key", ModelVersion: "model"}

_PENDING = "medmaas.audit.pending"


class Outcome(enum.StrEnum):
    ok = "ok"  # committed with the action, or a read that answered
    unchanged = "unchanged"  # a write request that answered < 400 but committed nothing
    denied = "denied"  # 401 / 403 / 404: not this key's to read or change
    failed = "failed"  # any other error


def outcome_for(status: int, write_request: bool) -> Outcome:
    """The outcome of a request whose row was not written with a commit of its action."""
    if status in (401, 403, 404):
        return Outcome.denied
    if status >= 400:
        return Outcome.failed
    return Outcome.unchanged if write_request else Outcome.ok


@dataclass(frozen=True)
class Actor:
    kind: str  # "key", "cli" or "system"
    via: str  # "api", "web", "cli" or "system"
    key_id: int | None = None
    key_prefix: str | None = None


CLI = Actor("cli", "cli")
SYSTEM = Actor("system", "system")


@dataclass
class Entry:
    """An audit row to write: filled in by the request (or a command), chained by `record`."""

    tenant_id: int | None
    actor: Actor | None
    action: str
    object_type: str | None = None
    object_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    client_addr: str | None = None
    request_id: str | None = None
    outcome: Outcome = Outcome.ok
    status: int | None = None
    created: dict[str, list[int]] = field(default_factory=dict)
    in_transaction: bool = False  # added to the session's open transaction
    written: bool = False  # committed


def sha256_json(value: Any) -> str:
    """sha256 of a value's canonical JSON text: how inputs are recorded without storing them."""
    return hashlib.sha256(canonical(value)).hexdigest()


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _ts_text(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def row_hash(ev: AuditEvent) -> str:
    return _digest({name: getattr(ev, name) for name in HASHED_FIELDS})


def _digest(row: dict[str, Any]) -> str:
    fields = {name: row[name] for name in HASHED_FIELDS}
    fields["ts"] = _ts_text(row["ts"])
    return hashlib.sha256(canonical(fields)).hexdigest()


def _create_head(session: Session, tenant_id: int) -> None:
    """The tenant's head row, created once, whoever races us."""
    head = {"tenant_id": tenant_id, "seq": 0, "hash": GENESIS}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(AuditHead).values(**head).on_conflict_do_nothing())
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(sqlite_insert(AuditHead).values(**head).on_conflict_do_nothing())
    else:
        session.execute(insert(AuditHead).values(**head))


def _lock_head(session: Session, tenant_id: int, step: int = 1) -> tuple[int, str]:
    """Take the tenant's head row lock and move its seq on by `step` (0: just lock it);
    returns (the new seq, the head's hash)."""
    bump = (
        update(AuditHead)
        .where(AuditHead.tenant_id == tenant_id)
        .values(seq=AuditHead.seq + step)
        .returning(AuditHead.seq, AuditHead.hash)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(bump).first()
    if row is None:  # the tenant's first row
        _create_head(session, tenant_id)
        row = session.execute(bump).one()
    return int(row[0]), str(row[1])


def _try_lock_head(session: Session, tenant_id: int) -> tuple[int, str] | None:
    """The head's (seq, hash) under its row lock, or None when another transaction holds it
    (PostgreSQL: SKIP LOCKED; SQLite serialises writers, so there it waits)."""
    if session.get_bind().dialect.name != "postgresql":
        return _lock_head(session, tenant_id, 0)
    locked = (
        select(AuditHead.seq, AuditHead.hash).where(AuditHead.tenant_id == tenant_id).with_for_update(skip_locked=True)
    )
    row = session.execute(locked).first()
    if row is None:
        exists = session.scalar(select(AuditHead.tenant_id).where(AuditHead.tenant_id == tenant_id))
        if exists is not None:
            return None  # locked: someone is chaining this tenant now
        _create_head(session, tenant_id)
        row = session.execute(locked).first()
    return None if row is None else (int(row[0]), str(row[1]))


def _text(value: str | None, length: int) -> str | None:
    return value.replace("\x00", "\ufffd")[:length] if value else None


def _row(entry: Entry) -> dict[str, Any]:
    """The columns of `entry`'s row, but for seq, prev_hash and hash."""
    if entry.tenant_id is None or entry.actor is None:
        raise ValueError("an audit entry needs a tenant and an actor")
    actor = entry.actor
    return {
        "tenant_id": entry.tenant_id,
        "ts": utcnow(),
        "actor": actor.kind,
        "via": actor.via,
        "key_id": actor.key_id,
        "key_prefix": actor.key_prefix,
        "action": entry.action,
        "object_type": entry.object_type,
        "object_id": _text(entry.object_id, 255),
        "outcome": Outcome(entry.outcome).value,
        "status": entry.status,
        "client_addr": _text(entry.client_addr, 64),
        "request_id": entry.request_id,
        # Stored as it reads back (JSON types, sorted keys), so the hash is reproducible;
        # NUL, which PostgreSQL text and jsonb refuse, becomes U+FFFD.
        "details": json.loads(canonical(entry.details).replace(b"\\u0000", b"\\ufffd")),
    }


def record(session: Session, entry: Entry) -> dict[str, Any]:
    """Append `entry` to its tenant's chain in the session's transaction (not committed);
    returns the row's values."""
    row = _row(entry)
    seq, prev_hash = _lock_head(session, row["tenant_id"])
    row.update(seq=seq, prev_hash=prev_hash)
    row["hash"] = _digest(row)
    # Core statements, not the unit of work: this runs on every write request.
    session.execute(insert(AuditEvent).values(**row))
    session.execute(
        update(AuditHead)
        .where(AuditHead.tenant_id == entry.tenant_id)
        .values(hash=row["hash"])
        .execution_options(synchronize_session=False)
    )
    return row


def append_unsealed(session: Session, *entries: Entry) -> list[dict[str, Any]]:
    """Append `entries` unsealed (one INSERT statement, no lock) in the session's transaction
    (not committed); `seal` chains them later. Each entry counts as added to the transaction,
    so the commit hooks (`install`) do not write it a second time. Returns the rows' values."""
    rows = append_rows(session, [unsealed_row(entry) for entry in entries])
    for entry in entries:
        entry.in_transaction = True
    return rows


def unsealed_row(entry: Entry) -> dict[str, Any]:
    """The row `append_rows` writes for `entry`, stamped now."""
    return _row(entry)


COPY_MIN_ROWS = 16  # from this many rows on PostgreSQL, one COPY instead of an executemany


def append_rows(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """INSERT rows made by `unsealed_row` (unsealed) in the session's transaction."""
    if not rows:
        return rows
    connection = session.connection()
    if len(rows) >= COPY_MIN_ROWS and connection.dialect.name == "postgresql":
        _copy_rows(connection, rows)
    else:
        # one cached Core statement with the rows as parameters (`.values(**row)` would build
        # and compile a new statement per row: a third of an inference worker's CPU at load;
        # the ORM's bulk insert path costs a read request's audit row twice the CPU)
        connection.execute(insert(_EVENTS), rows if len(rows) > 1 else rows[0])
    return rows


def _copy_rows(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """A batch (the reads of a web process, an inference worker's answered calls) by COPY:
    psycopg adapts each value in C, where executemany spends most of its time in SQLAlchemy's
    per-row parameter processing."""
    from psycopg.types.json import Jsonb

    columns = list(rows[0])
    statement = f"COPY {_EVENTS.name} ({', '.join(columns)}) FROM STDIN"
    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([Jsonb(row[c]) if c == "details" else row[c] for c in columns])


# -- sealing: chaining the unsealed rows ------------------------------------------------------

SEAL_BATCH = 1000  # rows chained per transaction
SEAL_AFTER = 500  # a web process seals a tenant inline after appending this many rows for it

_SEALED_FIELDS = [getattr(AuditEvent, name) for name in HASHED_FIELDS if name not in ("seq", "prev_hash")]
_EVENTS = cast(Table, AuditEvent.__table__)
_SEAL = (
    update(_EVENTS)
    .where(_EVENTS.c.id == bindparam("row_id"))
    .values(seq=bindparam("new_seq"), prev_hash=bindparam("new_prev"), hash=bindparam("new_hash"))
)


def seal_tenant(session: Session, tenant_id: int, limit: int = SEAL_BATCH, *, wait: bool = True) -> int:
    """Chain up to `limit` of the tenant's unsealed rows, oldest id first, under its head lock,
    in the session's transaction (not committed). wait=False: return 0 at once if another
    transaction holds the lock (PostgreSQL). Returns how many rows were sealed."""
    head = _lock_head(session, tenant_id, 0) if wait else _try_lock_head(session, tenant_id)
    if head is None:
        return 0
    seq, prev_hash = head
    rows = session.execute(
        select(AuditEvent.id, *_SEALED_FIELDS)
        .where(AuditEvent.tenant_id == tenant_id, AuditEvent.seq.is_(None))
        .order_by(AuditEvent.id)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    sealed = []
    for r in rows:
        seq += 1
        fields = {**r._mapping, "seq": seq, "prev_hash": prev_hash}
        prev_hash = _digest(fields)
        sealed.append({"row_id": r.id, "new_seq": seq, "new_prev": fields["prev_hash"], "new_hash": prev_hash})
    session.connection().execute(_SEAL, sealed)
    session.execute(
        update(AuditHead)
        .where(AuditHead.tenant_id == tenant_id)
        .values(seq=seq, hash=prev_hash)
        .execution_options(synchronize_session=False)
    )
    return len(sealed)


def _engine(bind: Engine | Connection | Session) -> Engine:
    if isinstance(bind, Session):
        bound = bind.get_bind()
        return bound if isinstance(bound, Engine) else bound.engine
    return bind if isinstance(bind, Engine) else bind.engine


def seal(bind: Engine | Connection | Session, tenant_id: int | None = None, *, batch: int = SEAL_BATCH) -> int:
    """Chain every unsealed row committed so far, of one tenant or of all, in transactions of
    at most `batch` rows that commit on their own (a session passed in is only used to find
    the engine: its own transaction is left alone). Returns how many rows were sealed."""
    engine = _engine(bind)
    with Session(engine) as s:
        if tenant_id is not None:
            tenants = [tenant_id]
        else:
            tenants = list(s.scalars(select(AuditEvent.tenant_id).where(AuditEvent.seq.is_(None)).distinct()))
        s.rollback()
        total = 0
        for tid in tenants:
            while True:
                n = seal_tenant(s, tid, batch)
                s.commit()
                total += n
                if n < batch:
                    break
    return total


class SealSchedule:
    """Counts the unsealed rows this process appended per tenant; `due` says when a tenant
    reached SEAL_AFTER of them (and starts its count again)."""

    def __init__(self, after: int = SEAL_AFTER) -> None:
        self.after = after
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()

    def due(self, tenant_id: int) -> bool:
        with self._lock:
            self._counts[tenant_id] += 1
            if self._counts[tenant_id] < self.after:
                return False
            del self._counts[tenant_id]
            return True


def seal_inline(engine: Engine, tenant_id: int, batch: int = SEAL_BATCH) -> int:
    """One bounded seal of a tenant by a web process (after a response): at most `batch`
    rows, and none if another process is sealing it right now. Never raises: the rows stay
    for the next seal."""
    try:
        with Session(engine) as s:
            n = seal_tenant(s, tenant_id, batch, wait=False)
            s.commit()
            return n
    except Exception:
        log.warning(
            "sealing the audit rows of tenant %s failed; the maintenance tick retries", tenant_id, exc_info=True
        )
        return 0


# -- recording with the action's transaction ----------------------------------------------


def attach(session: Session, entry: Entry) -> None:
    """Write `entry` in the session's next successful commit (see `install`)."""
    session.info[_PENDING] = entry


def pending(session: Session) -> Entry | None:
    return session.info.get(_PENDING)


def install(factory: sessionmaker[Session]) -> None:
    """Hooks on every session of `factory`: a session carrying an attached Entry writes it in
    its next commit, once."""
    event.listen(factory, "after_flush", _note_created)
    event.listen(factory, "before_commit", _write_pending)
    event.listen(factory, "after_commit", _committed)
    event.listen(factory, "after_soft_rollback", _rolled_back)


def _note_created(session: Session, _flush_context: Any) -> None:
    entry = pending(session)
    if entry is None or entry.written:
        return
    for obj in session.new:
        name = CREATED_TYPES.get(type(obj))
        if name is not None:
            entry.created.setdefault(name, []).append(obj.id)


def _write_pending(session: Session) -> None:
    entry = pending(session)
    if entry is None or entry.written or entry.in_transaction or entry.tenant_id is None or entry.actor is None:
        return
    session.flush()  # the action's own rows first: their ids name what it created
    # Named on a copy: if this commit fails, the entry is written later as it was.
    created = {k: sorted(set(v)) for k, v in entry.created.items()}
    object_id, mine = entry.object_id, created.get(entry.object_type or "")
    if object_id is None and mine:
        object_id = str(mine[0])
        if len(mine) == 1:
            created.pop(entry.object_type or "")
    details = {**entry.details, "created": created} if created else entry.details
    append_unsealed(session, replace(entry, object_id=object_id, details=details))
    entry.in_transaction = True


def _committed(session: Session) -> None:
    entry = pending(session)
    if entry is not None and entry.in_transaction:
        entry.written = True


def _rolled_back(session: Session, _previous_transaction: Any) -> None:
    entry = pending(session)
    if entry is not None and not entry.written:
        entry.in_transaction = False
        entry.created.clear()


# -- verification --------------------------------------------------------------------------


@dataclass
class ChainReport:
    tenant_id: int
    tenant: str
    rows: int = 0
    last_seq: int = 0
    broken_seq: int | None = None
    problem: str | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.intact:
            return f"tenant {self.tenant}: {self.rows} audit rows, chain intact (last seq {self.last_seq})"
        return f"tenant {self.tenant}: chain BROKEN at seq {self.broken_seq}: {self.problem}"


def verify_tenant(session: Session, tenant: Tenant, batch: int = 1000) -> ChainReport:
    """Seal the tenant's unsealed rows (in transactions of their own), then walk its chain in
    seq order and name the first row that was edited (its hash
    does not match its fields), deleted (a seq gap, or rows missing before the head's seq),
    or re-linked (its prev_hash is not the previous row's hash)."""
    seal(session, tenant.id)  # the unsealed rows committed so far join the chain first
    report = ChainReport(tenant.id, tenant.name)
    prev_hash, expected = GENESIS, 1
    rows = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.tenant_id == tenant.id, AuditEvent.seq.is_not(None))
        .order_by(AuditEvent.seq),
        execution_options={"yield_per": batch},
    )
    for ev in rows:
        seq = ev.seq or 0  # never None here: only sealed rows are read
        if seq != expected:
            gap = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
            return _broken(report, expected, f"row {gap} is missing (deleted); the chain resumes at seq {seq}")
        if ev.prev_hash != prev_hash:
            return _broken(
                report,
                seq,
                f"row seq {seq} (id {ev.id}) does not follow the row before it: its prev_hash is not the "
                f"hash of seq {seq - 1} (that row was edited, or rows were replaced)",
            )
        if row_hash(ev) != ev.hash:
            return _broken(report, seq, f"row seq {seq} (id {ev.id}) was edited: its hash does not match its contents")
        prev_hash, expected = ev.hash or "", expected + 1
        report.rows, report.last_seq = report.rows + 1, seq
    head = session.get(AuditHead, tenant.id)
    if head is not None and head.seq > report.last_seq:
        first, last = report.last_seq + 1, head.seq
        gap = f"seq {first}" if first == last else f"seq {first} to {last}"
        return _broken(report, first, f"row {gap} is missing (deleted from the end of the trail)")
    if head is not None and head.hash != prev_hash:
        return _broken(
            report, report.last_seq, f"row seq {report.last_seq} was edited: it does not match the trail's head"
        )
    return report


def _broken(report: ChainReport, seq: int, problem: str) -> ChainReport:
    report.broken_seq, report.problem = seq, problem
    return report


def verify(session: Session, tenant_name: str | None = None) -> list[ChainReport]:
    """A report per tenant (or for the named one; LookupError when there is none)."""
    query = select(Tenant).order_by(Tenant.id)
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    tenants = list(session.scalars(query))
    if tenant_name is not None and not tenants:
        raise LookupError(f"no tenant named {tenant_name!r}")
    return [verify_tenant(session, t) for t in tenants]


def as_dict(ev: AuditEvent) -> dict[str, Any]:
    """A row as exported (JSON lines, the API): every field, hashes included, so an export
    can be checked on its own."""
    return {
        "id": ev.id,
        **{name: getattr(ev, name) for name in HASHED_FIELDS},
        "ts": _ts_text(ev.ts),
        "hash": ev.hash,
    }


def export_lines(events: Iterator[AuditEvent]) -> Iterator[str]:
    for ev in events:
        yield json.dumps(as_dict(ev), sort_keys=True) + "\n"
