"""Model registry look-ups: `name`, `name@3`, `name@alias` -> a tenant's ModelVersion.

The resolver the kinds' spec checks use; app.stores.models builds the registry's other
queries on it."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

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
