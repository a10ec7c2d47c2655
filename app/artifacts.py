"""The artifact store: datasets, checkpoints, model bundles and score files.

A local directory tree addressed by file:// URLs (the default). Every path is under
<root>/tenant-<id>/..., so one tenant's files never mix with another's.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from app.config import Settings

CHUNK = 1024 * 1024


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def tenant_dir(self, tenant_id: int, *parts: str) -> Path:
        path = self.root.joinpath(f"tenant-{tenant_id}", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def new_dir(self, tenant_id: int, area: str) -> Path:
        return self.tenant_dir(tenant_id, area, uuid.uuid4().hex)

    def url(self, path: Path) -> str:
        return Path(path).resolve().as_uri()

    def path(self, url: str) -> Path:
        """The local path of a file:// URL inside the store (anything else is refused)."""
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise ValueError(f"unsupported artifact URL {url!r}")
        path = Path(parsed.path).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"artifact URL outside the store: {url!r}")
        return path

    @staticmethod
    def remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def job_dir(settings: Settings, tenant_id: int, job_id: int) -> Path:
    """A job's artifact directory: checkpoints, score files, scratch space."""
    return settings.artifacts / f"tenant-{tenant_id}" / "jobs" / str(job_id)


class UploadTooLarge(ValueError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"Upload larger than the {max_bytes} byte limit")
        self.max_bytes = max_bytes


def save_stream(stream: IO[bytes], dest: Path, max_bytes: int) -> tuple[int, str]:
    """Copy a stream to dest, hashing as it goes; UploadTooLarge once it passes max_bytes."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise UploadTooLarge(max_bytes)
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()
