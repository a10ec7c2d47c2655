"""Erasure, the part shared by deleting datasets, model versions and jobs.

One transaction decides. The object's row is locked first (`lock`: a no-op UPDATE, a row
lock on PostgreSQL and the database's write lock on SQLite), then the queued or running
jobs that use it are looked up (a Conflict naming them), then the rows go. A job being
submitted locks the rows its spec names before inserting itself (`hold`, called by
app.stores.jobs.lock_references): either it commits first and the deletion sees it (409),
or the deletion commits first and the submit finds the row gone (422). No job is left
pointing at a deleted object.

Files: before the commit each directory is renamed into the tenant's trash (one atomic
rename on the same file system, so no path derived from an id or a URL reaches it any
more); after the commit the trash entry is removed, and a failure there is logged, not
raised. If the commit fails the directories are moved back. A crash between the rename and
the commit leaves a row without its files (an object that was being erased); a crash after
the commit leaves a trash entry that nothing points at, swept by a later erasure.

On an object store (MEDMAAS_ARTIFACT_STORE=s3://...) nothing can be renamed: before the
commit a marker object naming the entry is written into the tenant's trash prefix; after
the commit the entry's objects (and this host's cached copies) are deleted, then the marker.
If the commit fails the markers go; a marker a crash left behind is swept like a trash entry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.artifacts import ArtifactStore
from app.config import Settings
from app.models import Job, JobState
from app.storage import ObjectStore
from app.stores.errors import Conflict

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.queued, JobState.running)
# The spec fields (as the kinds' checks store them) that name a dataset or a model version.
DATASET_FIELDS = ("dataset_id", "library_id")
MODEL_VERSION_FIELDS = ("model_version_id",)
TRASH = "trash"
TRASH_SWEEP_AGE_S = 3600.0  # older trash entries belong to no deletion still in flight


def lock(session: Session, model: Any, *where: Any) -> list[int]:
    """Lock the tenant's rows of `model` matching `where` for the rest of the transaction;
    returns their ids (empty: none match)."""
    stmt = update(model).where(*where).values(tenant_id=model.tenant_id).returning(model.id)
    return sorted(session.scalars(stmt.execution_options(synchronize_session=False)).all())


def hold(session: Session, model: Any, *where: Any) -> bool:
    """For a job about to be inserted: whether the row exists, locked against erasure until
    the transaction ends. PostgreSQL: FOR SHARE (concurrent submits do not wait for each
    other). SQLite: `lock`, i.e. the write lock, taken before the job's insert also because
    a SAVEPOINT that opens the transaction on pysqlite commits when it is released."""
    if session.get_bind().dialect.name == "sqlite":
        return bool(lock(session, model, *where))
    return session.scalar(select(model.id).where(*where).with_for_update(read=True)) is not None


def as_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def names_any(spec: Any, fields: Iterable[str], ids: Iterable[int]) -> bool:
    wanted = set(ids)
    return isinstance(spec, dict) and any(as_id(spec.get(f)) in wanted for f in fields)


def jobs_using(session: Session, tenant_id: int, uses: Callable[[str, dict[str, Any]], bool]) -> list[int]:
    """Ids of the tenant's queued or running jobs for which `uses(kind, spec)` holds."""
    rows = session.execute(
        select(Job.id, Job.kind, Job.spec).where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_STATES))
    ).all()
    return sorted(job_id for job_id, kind, spec in rows if uses(kind, spec or {}))


def refuse_while_used(session: Session, what: str, job_ids: list[int]) -> None:
    """Conflict (409) naming the queued or running jobs that use the object, if any (the
    transaction is rolled back, releasing the lock)."""
    if not job_ids:
        return
    session.rollback()
    shown = ", ".join(str(i) for i in job_ids[:20]) + (" ..." if len(job_ids) > 20 else "")
    raise Conflict(
        f"{what} is used by queued or running job(s) {shown}; wait for them to finish or cancel them "
        "(POST /api/v1/jobs/{id}/cancel), then delete again",
        "in_use",
        {"job_ids": job_ids},
    )


class Trash:
    """Directories of one erasure: moved into <root>/tenant-<id>/trash before the commit,
    removed after it (or moved back when the commit fails)."""

    def __init__(self, settings: Settings, tenant_id: int) -> None:
        self.store = ArtifactStore.from_settings(settings)
        self.tenant_id = tenant_id
        self.moved: list[tuple[Path, Path]] = []
        self.marked: list[tuple[Path, Path]] = []  # object store: (entry, its marker)

    @property
    def dir(self) -> Path:
        return self.store.root / f"tenant-{self.tenant_id}" / TRASH

    def move(self, path: Path | None) -> None:
        """Take `path` (a directory or file inside the tenant's part of the store) out of
        reach. Missing paths are skipped; anything outside the tenant's area is refused."""
        if path is None:
            return
        path = Path(path)
        tenant_root = self.store.root / f"tenant-{self.tenant_id}"
        if not path.resolve().is_relative_to(tenant_root) or path.resolve() == tenant_root:
            log.warning("erasure: not moving %s, outside tenant %s's artifacts", path, self.tenant_id)
            return
        remote = self.store.remote
        if remote is not None:
            self._mark(remote, path)
            return
        if not os.path.lexists(path):
            return
        dest = self.dir / uuid.uuid4().hex
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.rename(path, dest)
            os.utime(dest)  # the sweep's age counts from the move, not from when the files were made
        except OSError:
            log.exception("erasure: could not move %s to the trash; removing it in place after the commit", path)
            dest = path
        self.moved.append((path, dest))

    def _mark(self, remote: ObjectStore, path: Path) -> None:
        if not remote.exists(path):
            remote.drop_local(path)
            return
        marker = self.dir / f"{uuid.uuid4().hex}.json"
        rel = path.resolve().relative_to(self.store.root).as_posix()
        remote.put_bytes(marker, json.dumps({"entry": rel}).encode())
        self.marked.append((path, marker))

    def restore(self) -> None:
        remote = self.store.remote
        for _entry, marker in self.marked:
            try:
                if remote is not None:
                    remote.remove(marker)
            except OSError:
                log.exception("erasure: could not remove the trash marker %s", marker)
        self.marked.clear()
        for original, dest in reversed(self.moved):
            if dest == original:
                continue
            try:
                os.rename(dest, original)
            except OSError:
                log.exception("erasure: could not move %s back to %s", dest, original)
        self.moved.clear()

    def purge(self) -> None:
        """Remove this erasure's entries, and entries an earlier crash left behind."""
        for _original, dest in self.moved:
            _remove(dest)
        self.moved.clear()
        remote = self.store.remote
        if remote is not None:
            self._purge_marked(remote)
            return
        try:
            old = [p for p in self.dir.iterdir() if time.time() - p.lstat().st_mtime > TRASH_SWEEP_AGE_S]
        except OSError:
            return
        for path in old:
            _remove(path)

    def _purge_marked(self, remote: ObjectStore) -> None:
        entries = list(self.marked)
        self.marked.clear()
        try:
            for marker, info in remote.files(self.dir).items():
                modified = info.get("LastModified")
                if modified is not None and time.time() - modified.timestamp() > TRASH_SWEEP_AGE_S:
                    rel = json.loads(remote.get_bytes(marker))["entry"]
                    entries.append((self.store.root / rel, marker))
        except (OSError, ValueError, KeyError):
            log.exception("erasure: could not sweep tenant %s's trash markers", self.tenant_id)
        for entry, marker in entries:
            try:
                if entry.resolve().is_relative_to(self.store.root / f"tenant-{self.tenant_id}"):
                    remote.remove(entry)
                remote.remove(marker)
            except OSError:
                log.exception("erasure: could not remove %s (its row is gone; nothing points at it)", entry)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        log.exception("erasure: could not remove %s (its row is gone; nothing points at it)", path)


def commit(session: Session, trash: Trash) -> None:
    """Commit the deletion, then remove its files (moved back if the commit fails)."""
    try:
        session.commit()
    except BaseException:
        session.rollback()
        trash.restore()
        raise
    trash.purge()


def area_entry(store: ArtifactStore, tenant_id: int, area: str, url: str | None) -> Path | None:
    """The entry directly under <root>/tenant-<id>/<area>/ that holds the file at `url` (a
    dataset's directory for its upload or data file), or None for URLs elsewhere."""
    if not url:
        return None
    try:
        path = store.path(url)
    except ValueError:
        return None
    base = store.root / f"tenant-{tenant_id}" / area
    if not path.is_relative_to(base) or path == base:
        return None
    return base / path.relative_to(base).parts[0]
