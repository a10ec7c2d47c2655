"""The audit trail's queries: a tenant's rows filtered (action, object, key, time), as a
cursor page (newest first, rows not yet sealed included) or in chain order for an export
(sealed first)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app import audit
from app.models import AuditEvent
from app.stores.paging import cursor_page


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None  # exact, or a prefix ending in "." ("model." for every model action)
    object_type: str | None = None
    object_id: str | None = None
    key_id: int | None = None
    outcome: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive

    @classmethod
    def of(cls, args: dict[str, Any]) -> AuditFilter:
        return cls(**{name: args.get(name) for name in cls.__dataclass_fields__})


def query(tenant_id: int, f: AuditFilter) -> Select:
    q = select(AuditEvent).where(AuditEvent.tenant_id == tenant_id)
    if f.action:
        q = q.where(
            AuditEvent.action.startswith(f.action, autoescape=True)
            if f.action.endswith(".")
            else AuditEvent.action == f.action
        )
    if f.object_type:
        q = q.where(AuditEvent.object_type == f.object_type)
    if f.object_id:
        q = q.where(AuditEvent.object_id == f.object_id)
    if f.key_id is not None:
        q = q.where(AuditEvent.key_id == f.key_id)
    if f.outcome:
        q = q.where(AuditEvent.outcome == f.outcome)
    if f.since is not None:
        q = q.where(AuditEvent.ts >= f.since)
    if f.until is not None:
        q = q.where(AuditEvent.ts < f.until)
    return q


def list_page(
    session: Session, tenant_id: int, f: AuditFilter, limit: int = 100, cursor: int | None = None
) -> dict[str, Any]:
    """{"items", "next_cursor"}: the tenant's matching rows, newest first."""
    return cursor_page(session, query(tenant_id, f), AuditEvent.id, limit, cursor)


def in_order(session: Session, tenant_id: int, f: AuditFilter, batch: int = 1000) -> Iterator[AuditEvent]:
    """The tenant's matching rows in chain order (seq), read in batches, once the rows still
    unsealed have been chained (app.audit.seal, committed on its own)."""
    audit.seal(session, tenant_id)
    chained = query(tenant_id, f).where(AuditEvent.seq.is_not(None)).order_by(AuditEvent.seq)
    yield from session.scalars(chained, execution_options={"yield_per": batch})
