"""Tags: short labels on jobs and model versions (`baseline`, `paper-2`, `lr-sweep`), set,
added and removed by members, filtered on in the jobs list.

A tag is 1..64 characters: letters, digits and `.`, `_`, `-`, `:`, `+`, starting with a
letter or digit; an object carries at most MAX_TAGS, kept sorted and without duplicates."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import exists, func, literal_column, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from app.models import Job, ModelVersion
from app.registry import ModelNotFound
from app.stores.errors import Conflict, Invalid, NotFound

TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}$"
TAG_RULE = "1-64 letters, digits, '.', '_', '-', ':' or '+', starting with a letter or digit"
MAX_TAGS = 32
_TAG = re.compile(TAG_PATTERN)


def check(tags: Iterable[Any], field: str = "tags") -> list[str]:
    """The tags, validated: Invalid (422) naming `field` and the offending tag otherwise."""
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not _TAG.match(tag):
            message = f"Invalid tag {tag!r}: {TAG_RULE}"
            raise Invalid(message, "validation_error", {field: [message]})
        out.append(tag)
    return out


def merged(
    current: Iterable[str], *, replace: list[str] | None = None, add: Iterable[str] = (), remove: Iterable[str] = ()
) -> list[str]:
    """The new tag list: `replace` (when given) or `current`, plus `add`, minus `remove`;
    sorted, no duplicates; Invalid when it would exceed MAX_TAGS."""
    base = set(check(replace, "tags")) if replace is not None else set(current or [])
    result = (base | set(check(add, "add"))) - set(check(remove, "remove"))
    if len(result) > MAX_TAGS:  # the request is fine; the object's tags leave no room (409)
        message = f"At most {MAX_TAGS} tags per object; this would make {len(result)}"
        raise Conflict(message, "too_many_tags", {"tags": [message]})
    return sorted(result)


def has_tag(session: Session, column: Any, tag: str) -> ColumnElement[bool]:
    """SQL: the JSON list `column` contains `tag` (PostgreSQL: jsonb @>; SQLite: json_each)."""
    if session.get_bind().dialect.name == "postgresql":
        return type_coerce(column, JSONB).contains([tag])
    each = func.json_each(column).table_valued("value")
    return exists(select(literal_column("1")).select_from(each).where(each.c.value == tag))


def tag_job(
    session: Session,
    tenant_id: int,
    job_id: int,
    *,
    replace: list[str] | None = None,
    add: Iterable[str] = (),
    remove: Iterable[str] = (),
) -> Job:
    """Change a job's tags (any state: a finished run is where tags matter most); commits."""
    # locked: concurrent edits of one job's tags queue up instead of losing one
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id).with_for_update())
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    job.tags = merged(job.tags, replace=replace, add=add, remove=remove)
    session.commit()
    return job


def model_version(session: Session, tenant_id: int, name: str, number: int, *, lock: bool = False) -> ModelVersion:
    """The tenant's version `number` of model `name` (404 otherwise)."""
    q = select(ModelVersion).where(
        ModelVersion.tenant_id == tenant_id, ModelVersion.name == name, ModelVersion.version == number
    )
    mv = session.scalar(q.with_for_update() if lock else q)
    if mv is None:
        raise ModelNotFound(
            f"Model {name!r} version {number} not found; list its versions with GET /api/v1/models/{name}"
        )
    return mv


def tag_version(
    session: Session,
    tenant_id: int,
    name: str,
    number: int,
    *,
    replace: list[str] | None = None,
    add: Iterable[str] = (),
    remove: Iterable[str] = (),
) -> ModelVersion:
    """Change a model version's tags; commits."""
    mv = model_version(session, tenant_id, name, number, lock=True)
    mv.tags = merged(mv.tags, replace=replace, add=add, remove=remove)
    session.commit()
    return mv
