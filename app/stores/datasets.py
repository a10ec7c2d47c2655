"""Datasets: create from an upload (save the stream, ingest, insert; nothing left behind
on failure), look-ups and lists."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete as delete_rows
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import artifacts
from app import jobs as state_machine
from app.artifacts import ArtifactStore, save_stream
from app.config import Settings
from app.ingest import KINDS, IngestError, IngestLimits, IngestReport, ingest
from app.ingest.deid import tenant_seed
from app.ingest.preview import check_head, read_head, text_size
from app.models import TERMINAL_STATES, Dataset, DatasetStatus, Job
from app.secret_key import secret_key
from app.stores import erasure
from app.stores.errors import Invalid, NotFound
from app.stores.paging import cursor_page

# Upload form fields that are not ingest options.
RESERVED_FIELDS = frozenset({"kind", "name", "file", "options"})
INGEST_KIND = "ingest"  # app/kinds/ingest.py
STALE_SCRATCH_S = 24 * 3600  # no upload is parsed in a request for this long
# Publishes committed jobs to the broker: [(job id, queue)] (app.dispatch.publish_jobs).
Publish = Callable[[list[tuple[int, str]]], object]


def get(session: Session, tenant_id: int, dataset_id: int) -> Dataset:
    ds = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))
    if ds is None:
        raise NotFound(f"Dataset {dataset_id} not found")
    return settle(session, ds)


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
    if not all(isinstance(name, str) for name in options):  # a form part whose name did not parse
        raise Invalid("every option needs a name")
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
    publish: Publish | None = None,
) -> Dataset:
    """Save the stream, validate it and commit the dataset row. A bad file raises
    UploadTooLarge, Invalid (empty) or IngestError and leaves nothing behind; invalid rows
    inside a good file are counted and sampled.

    Text uploads (sequences, libraries) larger than settings.ingest_inline_max_bytes, or gzip
    ones that expand to more, get only the checks bounded by the bytes received (sniffing,
    options, header and first rows: app.ingest.preview); the dataset is then committed
    `processing` with an `ingest` job that parses it (workers/kinds/ingest.py), published
    with `publish` after the commit.

    Image uploads (which may hold DICOM files) are always parsed here and never kept: the
    upload is spooled to an unlinked temporary file, DICOM files are de-identified on the way
    out of it, extraction scratch lives outside the artifact root (`scratch`), and only the
    normalised data.npz (pixels and labels) is stored, under a file name that is not the
    uploaded one."""
    filename = safe_filename(filename or "upload")
    options = dict(options)
    store = ArtifactStore.from_settings(settings)
    work = store.new_dir(tenant_id, "datasets")
    limits = ingest_limits(settings)
    try:
        if kind == "images":
            with tempfile.TemporaryFile() as spool, scratch(settings) as tmp:
                size, sha256 = _save_upload(stream, spool, settings)
                seed = tenant_seed(secret_key(settings), tenant_id)
                report = ingest(kind, spool, filename, str(work), options, limits, deid_seed=seed, scratch_dir=tmp)
            filename = f"images-{sha256[:12]}.{report.stats['source_format']}"
            uri = store.url(Path(str(report.data_path)))
            ds = Dataset(tenant_id=tenant_id, name=name or filename, kind=kind, filename=filename, bytes=size)
            ds.sha256, ds.options, ds.uri = sha256, options, uri
            fill_from_report(ds, report, uri)
        else:
            if kind not in KINDS:  # before anything is read (the API's schema refuses it too)
                raise IngestError("invalid_kind", f"unknown dataset kind {kind!r}; expected one of: {', '.join(KINDS)}")
            original = work / f"upload-{filename}"
            size, sha256 = _save_upload(stream, original, settings)
            ds = Dataset(tenant_id=tenant_id, name=name or filename, kind=kind, filename=filename, bytes=size)
            ds.sha256, ds.options, ds.uri = sha256, options, store.url(original)
            head = read_head(str(original), filename, settings.ingest_inline_max_bytes)
            if head.whole:
                fill_from_report(ds, ingest(kind, str(original), filename, str(work), options, limits), ds.uri)
            else:
                with scratch(settings) as tmp:
                    check_head(kind, head, filename, tmp, options, limits)
                _processing(session, settings, ds)
        session.add(ds)
        session.commit()
    except BaseException:
        session.rollback()
        ArtifactStore.remove(work)  # nothing stored for a rejected upload
        raise
    if ds.status == DatasetStatus.processing and publish is not None and ds.job_id is not None:
        publish([(ds.job_id, settings.default_queue)])
    return ds


def _processing(session: Session, settings: Settings, ds: Dataset) -> None:
    """Make `ds` a dataset being parsed, with the ingest job that parses it (both flushed,
    committed by the caller together)."""
    ds.status = DatasetStatus.processing
    ds.rows, ds.invalid_rows, ds.invalid_samples, ds.schema, ds.stats = 0, 0, [], {}, {}
    ds.data_uri = ds.uri
    session.add(ds)
    session.flush()
    job, _ = state_machine.submit(
        session,
        tenant_id=ds.tenant_id,
        kind=INGEST_KIND,
        spec={"dataset_id": ds.id},
        queue=settings.default_queue,
        max_attempts=settings.default_max_attempts,
    )
    job.message = f"parsing dataset {ds.id}"
    ds.job_id = job.id


def fill_from_report(ds: Dataset, report: IngestReport, uri: str) -> None:
    """The validation report's figures on the dataset row (and its normalised copy's URL)."""
    ds.rows, ds.invalid_rows, ds.invalid_samples = report.rows, report.invalid_rows, report.invalid_samples
    ds.schema = report.schema
    ds.stats = {**report.stats, "warnings": report.warnings}
    ds.data_uri = artifacts.url_of(report.data_path) if report.data_path else uri
    ds.status, ds.error = DatasetStatus.ready, None


def ingest_limits(settings: Settings) -> IngestLimits:
    return IngestLimits(max_members=settings.archive_max_members, max_bytes=settings.archive_max_bytes)


@contextlib.contextmanager
def scratch(settings: Settings) -> Iterator[str]:
    """A private (0700) temporary directory for ingest scratch (extracted members, decoded
    pixels, the head of an upload), under settings.home and outside the artifact root: it
    holds plaintext even when artifacts are encrypted, and is removed on the way out."""
    root = settings.home.resolve() / "scratch"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in root.glob("ingest-*"):  # left by a process killed mid-upload
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_SCRATCH_S:
                shutil.rmtree(stale, ignore_errors=True)
    path = tempfile.mkdtemp(prefix="ingest-", dir=root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def parse_stored(
    session: Session,
    settings: Settings,
    tenant_id: int,
    dataset_id: int,
    progress: Callable[[float | None, int], None] | None = None,
) -> Dataset:
    """Parse a `processing` dataset's stored upload (the ingest job's work) and commit it
    `ready`, or `failed` with the IngestError's one sentence (re-raised). Re-running it after
    a crash gives the same result: outputs are written with open_write (renamed into place)
    and the row changes in one commit. A dataset that is no longer processing is returned
    as it is. ``progress(fraction or None when unknown, rows read)`` is called as it goes."""
    ds = get(session, tenant_id, dataset_id)
    if ds.status != DatasetStatus.processing:
        return ds
    store = ArtifactStore.from_settings(settings)
    original = store.path(ds.uri)
    for partial in original.parent.glob(".*.tmp"):  # left by an attempt that was killed
        partial.unlink(missing_ok=True)
    kind, filename, options = ds.kind, ds.filename, dict(ds.options or {})
    session.commit()  # no transaction held open while parsing
    on_rows = None
    if progress is not None:
        total = text_size(str(original))

        def on_rows(rows: int, offset: int) -> None:
            progress(min(offset / total, 0.99) if total and offset <= total else None, rows)

    try:
        report = ingest(
            kind, str(original), filename, str(original.parent), options, ingest_limits(settings), progress=on_rows
        )
    except IngestError as exc:
        mark_failed(session, tenant_id, dataset_id, exc.message)
        raise
    ds = get(session, tenant_id, dataset_id)
    if ds.status == DatasetStatus.processing:
        fill_from_report(ds, report, ds.uri)
        session.commit()
    return ds


def mark_failed(session: Session, tenant_id: int, dataset_id: int, error: str) -> None:
    """A processing dataset becomes failed, with `error` (one sentence) shown to the tenant."""
    session.execute(
        update(Dataset)
        .where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id, Dataset.status == DatasetStatus.processing)
        .values(status=DatasetStatus.failed, error=one_sentence(error))
    )
    session.commit()


def one_sentence(text: str) -> str:
    text = " ".join(text.split())[:500]
    return text if text.endswith(".") else text + "."


def settle(session: Session, ds: Dataset) -> Dataset:
    """A processing dataset whose ingest job ended without finishing it (cancelled, or
    failed after its worker was lost too often) becomes failed, naming why."""
    if ds.status != DatasetStatus.processing or ds.job_id is None:
        return ds
    job = session.get(Job, ds.job_id)
    if job is not None and job.state not in TERMINAL_STATES:
        return ds
    why = "its ingest job was deleted" if job is None else job.error or f"its ingest job was {job.state.value}"
    mark_failed(session, ds.tenant_id, ds.id, why)
    session.refresh(ds)
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
    store = ArtifactStore.from_settings(settings)
    trash = erasure.Trash(settings, tenant_id)
    for entry in {erasure.area_entry(store, tenant_id, "datasets", u) for u in (uri, data_uri)}:
        trash.move(entry)
    erasure.commit(session, trash)
