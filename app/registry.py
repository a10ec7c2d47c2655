"""Model registry look-ups: `name`, `name@3`, `name@alias` -> a tenant's ModelVersion.

The resolver the kinds' spec checks use; app.stores.models builds the registry's other
queries on it."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, make_transient_to_detached

from app.models import ModelAlias, ModelVersion
from app.stores.errors import NotFound


class ModelNotFound(NotFound):
    """No such model, version or alias for the tenant (a store NotFound: HTTP 404)."""


def split_ref(ref: str) -> tuple[str, str | None]:
    name, _, selector = ref.partition("@")
    return name, (selector or None)


def resolve(
    session: Session, tenant_id: int, name: str, version: int | None = None, alias: str | None = None
) -> ModelVersion:
    """A version by number, by alias, or the latest one."""
    q = select(ModelVersion).where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
    if alias is not None:
        number = session.scalar(
            select(ModelAlias.version).where(
                ModelAlias.tenant_id == tenant_id, ModelAlias.name == name, ModelAlias.alias == alias
            )
        )
        if number is None:
            raise ModelNotFound(f"Model {name!r} has no alias {alias!r}")
        version = number
    if version is not None:
        found = session.scalar(q.where(ModelVersion.version == version))
    else:
        found = session.scalar(q.order_by(ModelVersion.version.desc()).limit(1))
    if found is None:
        raise ModelNotFound(f"Model {name!r}" + (f" version {version}" if version is not None else "") + " not found")
    return found


VersionKey = tuple[int, str, int | None, str | None]


class VersionCache:
    """Resolved versions by (tenant, name, version, alias), each trusted for ttl_s after it
    was read (0: no caching), at most max_entries (least recently used dropped first). What
    it hands out is a detached copy of the row: read-only, shared by threads. Thread-safe;
    one per process (app.stores.models.SERVING)."""

    def __init__(
        self, ttl_s: float = 2.0, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._rows: OrderedDict[VersionKey, tuple[float, ModelVersion]] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(
        self, session: Session, tenant_id: int, name: str, version: int | None = None, alias: str | None = None
    ) -> ModelVersion:
        """`resolve`, read through the cache."""
        if self.ttl_s <= 0:
            return resolve(session, tenant_id, name, version=version, alias=alias)
        key: VersionKey = (tenant_id, name, version, alias)
        now = self.clock()
        with self._lock:
            hit = self._rows.get(key)
            if hit is not None and now - hit[0] < self.ttl_s:
                self._rows.move_to_end(key)
                return hit[1]
        found = detached_copy(resolve(session, tenant_id, name, version=version, alias=alias))
        with self._lock:
            self._rows[key] = (now, found)
            self._rows.move_to_end(key)
            while len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)
        return found

    def clear(self) -> None:
        """Forget every entry (this process changed an alias or deleted a version)."""
        with self._lock:
            self._rows.clear()


def detached_copy(mv: ModelVersion) -> ModelVersion:
    """The row's column values as a detached ModelVersion (no session, no lazy loads)."""
    values: dict[str, Any] = {attr.key: getattr(mv, attr.key) for attr in inspect(ModelVersion).column_attrs}
    copy = ModelVersion(**values)
    make_transient_to_detached(copy)
    return copy


def resolve_ref(session: Session, tenant_id: int, ref: str) -> ModelVersion:
    """`name` (latest), `name@7` (version 7) or `name@production` (alias)."""
    name, selector = split_ref(ref)
    if selector is None:
        return resolve(session, tenant_id, name)
    if selector.isdigit():
        return resolve(session, tenant_id, name, version=int(selector))
    return resolve(session, tenant_id, name, alias=selector)


def aliases_for(session: Session, tenant_id: int, name: str) -> dict[str, int]:
    rows = session.execute(
        select(ModelAlias.alias, ModelAlias.version).where(ModelAlias.tenant_id == tenant_id, ModelAlias.name == name)
    ).all()
    return dict(rows)


def model_names(session: Session, tenant_id: int) -> list[tuple[str, int, int]]:
    """(name, latest version, number of versions) for each of the tenant's models."""
    rows = session.execute(
        select(ModelVersion.name, func.max(ModelVersion.version), func.count())
        .where(ModelVersion.tenant_id == tenant_id)
        .group_by(ModelVersion.name)
        .order_by(ModelVersion.name)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]
