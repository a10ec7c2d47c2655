"""API keys: random, shown once, stored as a SHA-256 hash behind a visible prefix.

`verify` answers from a per-process cache (KEYS) for a short time (KeyCache.ttl_s, 5 s by
default) after a key's row was read, so an authenticated request does not pay a database
round trip for its key. A revocation (or rotation) made by this process takes effect at once;
one made by another process, or a row edited by hand, within ttl_s. Expiry is checked on
every use against the cached expires_at.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, inspect, select, update
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import manager_of_class, set_committed_value

from app.models import ApiKey, KeyRole, Tenant, WebSession, utcnow

KEY_PREFIX = "mm_"


def _hash(secret: str) -> str:
    # Keys carry 256 bits of entropy, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


class KeyRefused(Exception):
    """A presented key that does not authenticate; the message says why (unknown, revoked, expired)."""


class KeyAlreadyRevoked(Exception):
    """A revoked key cannot be rotated (its replacement would bring it back to life)."""

    def __init__(self, key: ApiKey) -> None:
        super().__init__(f"API key {key.id} is revoked")


class LastAdminKey(Exception):
    """Revoking this key would leave its tenant without an active admin key."""

    def __init__(self) -> None:
        super().__init__("this is the last admin key of the tenant")


def new_key(
    session: Session,
    tenant_id: int,
    name: str = "",
    role: KeyRole = KeyRole.admin,
    expires_in_days: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; return the row and the full secret (shown once: only its hash is stored)."""
    prefix = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days is not None else None
    key = ApiKey(
        tenant_id=tenant_id,
        prefix=prefix,
        key_hash=_hash(secret),
        name=name,
        role=KeyRole(role),
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key, secret


def create_key(
    session: Session,
    tenant: Tenant,
    name: str = "",
    role: KeyRole = KeyRole.admin,
    expires_in_days: int | None = None,
) -> str:
    """Create a key and return the full secret; only its hash is stored."""
    return new_key(session, tenant.id, name, role, expires_in_days)[1]


def refusal(key: ApiKey, now: datetime | None = None) -> str | None:
    """Why a stored key may not be used now ("API key revoked" / "API key expired"), or None."""
    if key.revoked_at is not None:
        return "API key revoked"
    if key.expires_at is not None and key.expires_at <= (now or utcnow()):
        return "API key expired"
    return None


class KeyCache:
    """Key rows by key hash, each trusted for ttl_s after it was read (0: no caching), at most
    max_entries (least recently used dropped first). Thread-safe; one per process."""

    def __init__(
        self, ttl_s: float = 5.0, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._rows: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> dict[str, Any] | None:
        with self._lock:
            hit = self._rows.get(key_hash)
            if hit is None:
                return None
            if self.clock() - hit[0] >= self.ttl_s:
                del self._rows[key_hash]
                return None
            self._rows.move_to_end(key_hash)
            return hit[1]

    def put(self, key: ApiKey) -> None:
        if self.ttl_s <= 0:
            return
        row = {attr.key: getattr(key, attr.key) for attr in inspect(ApiKey).column_attrs}
        with self._lock:
            self._rows[key.key_hash] = (self.clock(), row)
            self._rows.move_to_end(key.key_hash)
            while len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)

    def used(self, key_hash: str, at: datetime) -> None:
        """Record a last_used_at written for the key, so the cached row does not ask again."""
        with self._lock:
            hit = self._rows.get(key_hash)
            if hit is not None:
                hit[1]["last_used_at"] = at

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._rows.pop(key_hash, None)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


KEYS = KeyCache()


def configure_cache(ttl_s: float) -> None:
    """Set this process's key cache lifetime (0 turns the cache off)."""
    KEYS.ttl_s = ttl_s
    KEYS.clear()


def _from_cache(row: dict[str, Any]) -> ApiKey:
    """The cached row as a detached ApiKey: no SELECT, and no session work at all (`touch`
    writes last_used_at with an UPDATE of its own)."""
    key = _KEY_CLASS.new_instance()  # the loaded values set as a query would (no __init__ events)
    key.__dict__.update(row)
    make_transient_to_detached(key)
    return key


_KEY_CLASS = manager_of_class(ApiKey)


def verify(session: Session, presented: str) -> ApiKey:
    """The usable ApiKey for a presented secret (constant-time hash comparison), or KeyRefused."""
    if not presented.startswith(KEY_PREFIX):
        raise KeyRefused("Invalid API key")
    prefix = presented[len(KEY_PREFIX) :].split("_", 1)[0]
    if len(prefix) != 12:
        raise KeyRefused("Invalid API key")
    digest = _hash(presented)
    cached = KEYS.get(digest)
    if cached is not None:
        key = _from_cache(cached)  # found by the full hash: it is this secret's row
    else:
        found = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if found is None or not hmac.compare_digest(found.key_hash, digest):
            raise KeyRefused("Invalid API key")
        key = found
        KEYS.put(key)
    reason = refusal(key)
    if reason is not None:
        raise KeyRefused(reason)
    return key


def authenticate(session: Session, presented: str) -> ApiKey | None:
    """The usable ApiKey for a presented secret, or None (unknown, revoked or expired)."""
    try:
        return verify(session, presented)
    except KeyRefused:
        return None


def tenant_keys(session: Session, tenant_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)))


def tenant_key(session: Session, tenant_id: int, key_id: int) -> ApiKey | None:
    """The tenant's key `key_id`, or None (no such key, or another tenant's)."""
    key = session.get(ApiKey, key_id)
    return key if key is not None and key.tenant_id == tenant_id else None


def revoke(session: Session, key: ApiKey, force: bool = False) -> None:
    """Revoke a key (idempotent). Refuses (LastAdminKey) to revoke the tenant's last active
    admin key unless forced: the tenant could no longer manage its keys."""
    if key.revoked_at is not None:
        return
    now = utcnow()
    if key.role == KeyRole.admin and refusal(key, now) is None and not force:
        active_admins = session.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.tenant_id == key.tenant_id,
                ApiKey.role == KeyRole.admin,
                ApiKey.revoked_at.is_(None),
                (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
            )
        )
        if (active_admins or 0) <= 1:
            raise LastAdminKey()
    key.revoked_at = now
    KEYS.forget(key.key_hash)
    end_web_sessions(session, key)
    session.flush()


def rotate(session: Session, key: ApiKey) -> tuple[ApiKey, str]:
    """A new secret for the same tenant, name and role (and the same remaining lifetime); the
    old key is revoked. The last-admin rule does not apply: the new key replaces it.
    KeyAlreadyRevoked for a revoked key."""
    if key.revoked_at is not None:
        raise KeyAlreadyRevoked(key)
    new, secret = new_key(session, key.tenant_id, key.name, key.role)
    new.expires_at = key.expires_at
    key.revoked_at = utcnow()
    KEYS.forget(key.key_hash)
    end_web_sessions(session, key)
    session.flush()
    return new, secret


def end_web_sessions(session: Session, key: ApiKey) -> None:
    """End every browser session signed in with `key` (revoked or rotated away)."""
    session.execute(
        update(WebSession)
        .where(WebSession.key_id == key.id, WebSession.ended_at.is_(None))
        .values(ended_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def touch(session: Session, key: ApiKey) -> bool:
    """Record that the key was used, at most once a minute (not a write per request): an
    UPDATE in the session's transaction, not committed. Returns whether it wrote."""
    now = utcnow()
    if key.last_used_at is not None and (now - key.last_used_at).total_seconds() <= 60:
        return False
    session.execute(
        update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now).execution_options(synchronize_session=False)
    )
    set_committed_value(key, "last_used_at", now)
    KEYS.used(key.key_hash, now)
    return True
