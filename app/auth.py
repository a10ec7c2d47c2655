"""API keys: random, shown once, stored as a SHA-256 hash behind a visible prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant, utcnow

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


def create_key(session: Session, tenant: Tenant, name: str = "") -> str:
    """Create a key and return the full secret; only its hash is stored."""
    prefix = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=_hash(secret), name=name))
    session.flush()
    return secret


def authenticate(session: Session, presented: str) -> ApiKey | None:
    """The ApiKey for a presented secret, or None. Constant-time hash comparison."""
    if not presented.startswith(KEY_PREFIX):
        return None
    prefix = presented[len(KEY_PREFIX) :].split("_", 1)[0]
    if len(prefix) != 12:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))
    if key is None or not hmac.compare_digest(key.key_hash, _hash(presented)):
        return None
    return key


def touch(session: Session, key: ApiKey) -> None:
    now = utcnow()
    # Avoid a write per request: last_used_at is only refreshed once a minute.
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
        key.last_used_at = now
