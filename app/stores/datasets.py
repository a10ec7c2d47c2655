"""Datasets: create from an upload (save the stream, ingest, insert; nothing left behind
on failure), look-ups and lists."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete as delete_rows
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.artifacts import ArtifactStore, save_stream
from app.config import Settings
from app.ingest import KINDS, IngestLimits, ingest
from app.ingest.deid import tenant_seed
from app.models import Dataset
from app.secret_key import secret_key
from app.stores import erasure
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
    inside a good file are counted and sampled.

    Image uploads (which may hold DICOM files) are never kept: the upload is spooled to an
    unlinked temporary file, DICOM files are de-identified on the way out of it, and only
    the normalised data.npz (pixels and labels) is stored, under a file name that is not
    the uploaded one."""
    filename = safe_filename(filename or "upload")
    options = dict(options)
    store = ArtifactStore.from_settings(settings)
    work = store.new_dir(tenant_id, "datasets")
    limits = IngestLimits(max_members=settings.archive_max_members, max_bytes=settings.archive_max_bytes)
    try:
        if kind == "images":
            with tempfile.TemporaryFile() as spool:
                size, sha256 = _save_upload(stream, spool, settings)
                seed = tenant_seed(secret_key(settings), tenant_id)
                report = ingest(kind, spool, filename, str(work), options, limits, deid_seed=seed)
            filename = f"images-{sha256[:12]}.{report.stats['source_format']}"
            uri = data_uri = store.url(Path(str(report.data_path)))
        else:
            original = work / f"upload-{filename}"
            size, sha256 = _save_upload(stream, original, settings)
            report = ingest(kind, str(original), filename, str(work), options, limits)
            uri = store.url(original)
            data_uri = store.url(Path(report.data_path)) if report.data_path else uri
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
            uri=uri,
            data_uri=data_uri,
        )
        session.add(ds)
        session.commit()
    except BaseException:
        ArtifactStore.remove(work)  # nothing stored for a rejected upload
        raise
    return ds


def _save_upload(stream: IO[bytes], dest: Path | IO[bytes], settings: Settings) -> tuple[int, str]:
    size, sha256 = save_stream(stream, dest, settings.max_upload_bytes)
    if size == 0:
        raise Invalid("The uploaded file is empty", "empty_file")
    return size, sha256


def jobs_using(session: Session, tenant_id: int, dataset_id: int) -> list[int]:
    """Ids of the queued or running jobs whose spec names the dataset (they block deleting it)."""
    return erasure.jobs_using(
        session, tenant_id, lambda _kind, spec: erasure.names_any(spec, erasure.DATASET_FIELDS, [dataset_id])
    )


def delete(session: Session, settings: Settings, tenant_id: int, dataset_id: int) -> None:
    """Erase a dataset: its row, then its files (app.stores.erasure). Conflict naming the
    queued or running jobs whose spec names it; model versions trained on it keep working
    (their dataset_id becomes null)."""
    if not erasure.lock(session, Dataset, Dataset.id == dataset_id, Dataset.tenant_id == tenant_id):
        session.rollback()
        raise NotFound(f"Dataset {dataset_id} not found")
    erasure.refuse_while_used(session, f"Dataset {dataset_id}", jobs_using(session, tenant_id, dataset_id))
    uri, data_uri = session.execute(select(Dataset.uri, Dataset.data_uri).where(Dataset.id == dataset_id)).one()
    session.execute(delete_rows(Dataset).where(Dataset.id == dataset_id))
    store = ArtifactStore(settings.artifacts)
    trash = erasure.Trash(settings, tenant_id)
    for entry in {erasure.area_entry(store, tenant_id, "datasets", u) for u in (uri, data_uri)}:
        trash.move(entry)
    erasure.commit(session, trash)
