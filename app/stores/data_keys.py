"""Tenants' data keys for encryption at rest: created on a tenant's first encrypted write,
stored wrapped by the master key, re-wrapped when the master key is rotated."""

from __future__ import annotations

import os
import threading
from collections import Counter

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.crypto import KEY_BYTES, DecryptionError, key_fingerprint, unwrap_key, wrap_key
from app.db import Database
from app.models import TenantDataKey, utcnow
from app.stores.errors import Conflict


def get_or_create(session: Session, master: bytes, tenant_id: int) -> tuple[int, bytes]:
    """(key id, data key) of the tenant, made and committed on first use."""
    row = session.scalar(select(TenantDataKey).where(TenantDataKey.tenant_id == tenant_id))
    if row is None:
        row = TenantDataKey(
            tenant_id=tenant_id,
            master_key_id=key_fingerprint(master),
            wrapped_key=wrap_key(master, tenant_id, os.urandom(KEY_BYTES)),
        )
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # another process made it first
            session.rollback()
            row = session.scalars(select(TenantDataKey).where(TenantDataKey.tenant_id == tenant_id)).one()
    return row.id, unwrap(row, master)


def get(session: Session, master: bytes, tenant_id: int, key_id: int) -> bytes:
    row = session.scalar(select(TenantDataKey).where(TenantDataKey.id == key_id, TenantDataKey.tenant_id == tenant_id))
    if row is None:
        raise DecryptionError(f"no data key {key_id} for tenant {tenant_id}")
    return unwrap(row, master)


def unwrap(row: TenantDataKey, master: bytes) -> bytes:
    fingerprint = key_fingerprint(master)
    if row.master_key_id != fingerprint:
        raise DecryptionError(
            f"the data key of tenant {row.tenant_id} is wrapped by master key {row.master_key_id}, "
            f"but MEDMAAS_ENCRYPTION_KEY is key {fingerprint}"
        )
    return unwrap_key(master, row.tenant_id, row.wrapped_key)


def rotate_master(session: Session, old: bytes, new: bytes) -> int:
    """Re-wrap every data key from `old` to `new` in the caller's transaction; the number of
    keys re-wrapped. Keys already under `new` are left alone (a rerun is harmless); a key
    under neither is a Conflict and nothing changes."""
    old_id, new_id = key_fingerprint(old), key_fingerprint(new)
    rows = session.scalars(select(TenantDataKey).with_for_update().order_by(TenantDataKey.id)).all()
    strangers = sorted({r.master_key_id for r in rows} - {old_id, new_id})
    if strangers:
        raise Conflict(f"data keys wrapped by unknown master keys {', '.join(strangers)}; nothing was changed")
    done = 0
    for row in rows:
        if row.master_key_id == new_id:
            continue
        data_key = unwrap(row, old)
        row.wrapped_key = wrap_key(new, row.tenant_id, data_key)
        row.master_key_id = new_id
        row.rewrapped_at = utcnow()
        done += 1
    return done


def master_key_counts(session: Session) -> dict[str, int]:
    """How many data keys each master key (by fingerprint) wraps."""
    return dict(Counter(session.scalars(select(TenantDataKey.master_key_id)).all()))


class Keyring:
    """A process's view of the data keys for one master key: unwrapped keys are cached
    (rotation changes the wrapping only, never a data key), looked up in short sessions of
    their own."""

    def __init__(self, master: bytes, database_url: str) -> None:
        self.master = master
        self.database_url = database_url
        self._db: Database | None = None
        self._lock = threading.Lock()
        self._for_write: dict[int, tuple[int, bytes]] = {}
        self._by_id: dict[tuple[int, int], bytes] = {}

    def _database(self) -> Database:
        if self._db is None:
            self._db = Database(self.database_url)
        return self._db

    def for_write(self, tenant_id: int) -> tuple[int, bytes]:
        with self._lock:
            if tenant_id not in self._for_write:
                with self._database().session() as s:
                    key_id, key = get_or_create(s, self.master, tenant_id)
                self._for_write[tenant_id] = (key_id, key)
                self._by_id[(tenant_id, key_id)] = key
            return self._for_write[tenant_id]

    def for_read(self, tenant_id: int, key_id: int) -> bytes:
        with self._lock:
            if (tenant_id, key_id) not in self._by_id:
                with self._database().session() as s:
                    self._by_id[(tenant_id, key_id)] = get(s, self.master, tenant_id, key_id)
            return self._by_id[(tenant_id, key_id)]

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
            self._db = None
