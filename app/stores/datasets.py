"""Datasets: create from an upload (save the stream, ingest, insert; nothing left behind
on failure), look-ups and lists."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.artifacts import ArtifactStore, save_stream
from app.config import Settings
from app.ingest import KINDS, IngestLimits, ingest
from app.models import Dataset
from app.stores.errors import Invalid, NotFound
from app.stores.paging import cursor_page

# Upload form fields that are not ingest options.
RESERVED_FIELDS = frozenset({"kind", "name", "file", "options"})


def get(session: Session, tenant_id: int, dataset_id: int) -> Dataset:
    ds = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))
    if ds is None:
        raise NotFound(f"Dataset {dataset_id} not found")
    return ds


def list_page(
    session: Session, tenant_id: int, *, kind: str | None = None, limit: int = 100, cursor: int | None = None
) -> dict[str, Any]:
    """{"items", "next_cursor"}: the tenant's datasets newest first."""
    q = select(Dataset).where(Dataset.tenant_id == tenant_id)
    if kind is not None:
        q = q.where(Dataset.kind == kind)
    return cursor_page(session, q, Dataset.id, limit, cursor)


def of_kinds(session: Session, tenant_id: int, kinds: Iterable[str] = KINDS, limit: int = 500) -> list[Dataset]:
    """The tenant's datasets of these kinds, newest first (pickers and the datasets page)."""
    return list(
        session.scalars(
            select(Dataset)
            .where(Dataset.tenant_id == tenant_id, Dataset.kind.in_(list(kinds)))
            .order_by(Dataset.id.desc())
            .limit(limit)
        ).all()
    )


def upload_options(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Ingest options from an upload form: the `options` JSON object, then every field
    that is not the form's own (text_column=..., ...)."""
    options: dict[str, Any] = {}
    if fields.get("options"):
        try:
            options = json.loads(fields["options"])
        except ValueError:
            raise Invalid("options must be a JSON object") from None
        if not isinstance(options, dict):
            raise Invalid("options must be a JSON object")
    options.update({k: v for k, v in fields.items() if k not in RESERVED_FIELDS})
    return options


def safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:200] or "upload"


def create_from_upload(
    session: Session,
    settings: Settings,
    tenant_id: int,
    *,
    kind: str,
    stream: IO[bytes],
    filename: str | None,
    options: Mapping[str, Any],
    name: str | None = None,
) -> Dataset:
    """Save the stream, validate it (ingest) and commit the dataset row. A bad file raises
    UploadTooLarge, Invalid (empty) or IngestError and leaves nothing behind; invalid rows
    inside a good file are counted and sampled."""
    filename = safe_filename(filename or "upload")
    options = dict(options)
    store = ArtifactStore(settings.artifacts)
    work = store.new_dir(tenant_id, "datasets")
    try:
        original = work / f"upload-{filename}"
        size, sha256 = save_stream(stream, original, settings.max_upload_bytes)
        if size == 0:
            raise Invalid("The uploaded file is empty", "empty_file")
        limits = IngestLimits(max_members=settings.archive_max_members, max_bytes=settings.archive_max_bytes)
        report = ingest(kind, str(original), filename, str(work), options, limits)
        ds = Dataset(
            tenant_id=tenant_id,
            name=name or filename,
            kind=kind,
            filename=filename,
            bytes=size,
            sha256=sha256,
            rows=report.rows,
            invalid_rows=report.invalid_rows,
            invalid_samples=report.invalid_samples,
            schema=report.schema,
            stats={**report.stats, "warnings": report.warnings},
            options=options,
            uri=store.url(original),
            data_uri=store.url(Path(report.data_path)) if report.data_path else store.url(original),
        )
        session.add(ds)
        session.commit()
    except BaseException:
        ArtifactStore.remove(work)  # nothing stored for a rejected upload
        raise
    return ds
