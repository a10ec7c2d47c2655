"""The artifact store: datasets, checkpoints, model bundles and score files.

A local directory tree addressed by file:// URLs (the default). Every path is under
<root>/tenant-<id>/..., so one tenant's files never mix with another's.

Every artifact file is written with `open_write` and read with `open_read`. With
MEDMAAS_ENCRYPTION_KEY set they encrypt and decrypt (app/crypto.py) with the tenant's data
key, bound to the file's path under the root; without it they are plain files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Self
from urllib.parse import urlparse

from app.config import Settings
from app.crypto import HEADER_SIZE, DecryptionError, EncryptedReader, EncryptedWriter, Header, is_encrypted

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from app.stores.data_keys import Keyring

CHUNK = 1024 * 1024


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        """The store of these settings, with encryption configured for its files."""
        configure(settings)
        return cls(settings.artifacts)

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
    configure(settings)
    return settings.artifacts / f"tenant-{tenant_id}" / "jobs" / str(job_id)


class UploadTooLarge(ValueError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"Upload larger than the {max_bytes} byte limit")
        self.max_bytes = max_bytes


def save_stream(stream: IO[bytes], dest: Path | IO[bytes], max_bytes: int) -> tuple[int, str]:
    """Copy a stream to dest (an artifact path, or an open file such as an unlinked
    temporary one), hashing as it goes; UploadTooLarge once it passes max_bytes."""
    digest = hashlib.sha256()
    size = 0
    with open_write(dest) if isinstance(dest, Path) else contextlib.nullcontext(dest) as out:
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


# -- encryption at rest ------------------------------------------------------------

_keyrings: dict[Path, Keyring] = {}  # artifact root -> the keyring its files use
_keyrings_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Encrypt files under settings' artifact root when it has an encryption key (cheap
    when nothing changed, so callers just call it before touching files)."""
    root = settings.artifacts.resolve()
    with _keyrings_lock:
        current = _keyrings.get(root)
        if not settings.encryption_key:
            if current is not None:
                _keyrings.pop(root).close()
            return
        from app.crypto import parse_master_key
        from app.stores.data_keys import Keyring

        master = parse_master_key(settings.encryption_key)
        if current is not None and current.master == master and current.database_url == settings.sqlalchemy_url:
            return
        if current is not None:
            current.close()
        _keyrings[root] = Keyring(master, settings.sqlalchemy_url)


def _keyring_of(path: Path) -> tuple[Keyring, int, bytes] | None:
    """(keyring, tenant id, binding) for a file under an encrypted root, else None."""
    for root, keyring in list(_keyrings.items()):
        if path.is_relative_to(root):
            rel = path.relative_to(root)
            top = rel.parts[0] if rel.parts else ""
            if not top.startswith("tenant-") or not top[7:].isdigit():
                raise ValueError(f"artifact outside a tenant directory: {rel}")
            return keyring, int(top[7:]), rel.as_posix().encode()
    return None


def open_read(path: str | os.PathLike[str]) -> io.BufferedReader:
    """A seekable binary reader of an artifact file's plaintext. A plain file (written
    before encryption was turned on) reads as it is; an encrypted one needs the key."""
    path = Path(path).resolve()
    fh = open(path, "rb", buffering=0)  # noqa: SIM115 (returned, closed by the caller)
    try:
        encrypted = is_encrypted(fh.read(HEADER_SIZE))
        fh.seek(0)
        if not encrypted:
            return io.BufferedReader(fh)
        found = _keyring_of(path)
        if found is None:
            raise DecryptionError(f"{path.name} is encrypted; set MEDMAAS_ENCRYPTION_KEY to read it")
        keyring, tenant_id, binding = found

        def key_for(header: Header) -> bytes:
            if header.tenant_id != tenant_id:
                raise DecryptionError(f"{path.name} belongs to tenant {header.tenant_id}, not {tenant_id}")
            return keyring.for_read(tenant_id, header.key_id)

        reader = EncryptedReader(fh, key_for, binding)
    except BaseException:
        fh.close()
        raise
    return io.BufferedReader(reader, buffer_size=reader.header.segment)


def plaintext_size(path: str | os.PathLike[str]) -> int:
    """The size of what open_read returns (without decrypting anything but the last segment)."""
    with open_read(path) as fh:
        return fh.seek(0, io.SEEK_END)


def sendable(path: Path) -> Path | io.BufferedReader:
    """What a download sends: a plain file by its path (ranges, ETag), an encrypted one as
    a stream of its plaintext."""
    with open(path, "rb") as fh:
        if not is_encrypted(fh.read(HEADER_SIZE)):
            return path
    return open_read(path)


def open_write(path: str | os.PathLike[str]) -> ArtifactWriter:
    """A binary writer for an artifact file: encrypted when its root is configured so. The
    file appears at `path` only when closed without error (written under a temporary name,
    then renamed), so readers never see half a file."""
    path = Path(path).resolve()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fh = open(tmp, "xb", buffering=0)  # noqa: SIM115 (owned by the writer)
    try:
        found = _keyring_of(path)
        inner: io.RawIOBase = fh
        if found is not None:
            keyring, tenant_id, binding = found
            key_id, key = keyring.for_write(tenant_id)
            inner = EncryptedWriter(io.BufferedWriter(fh, 1 << 20), key, tenant_id, key_id, binding)
            return ArtifactWriter(path, tmp, inner)
        return ArtifactWriter(path, tmp, io.BufferedWriter(fh, 1 << 20))
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)
        raise


class ArtifactWriter(io.RawIOBase, BinaryIO):  # BinaryIO: accepted wherever IO[bytes] is
    """Write-only file object returned by open_write. Leaving a `with` block by an
    exception (or dropping it unclosed) discards the file instead of publishing it."""

    def __init__(self, path: Path, tmp: Path, inner: io.RawIOBase | io.BufferedIOBase) -> None:
        self.path, self._tmp, self._inner = path, tmp, inner

    @property
    def name(self) -> str:
        return str(self.path)

    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer) -> int:
        n = self._inner.write(b)
        return len(memoryview(b)) if n is None else n

    def tell(self) -> int:
        return self._inner.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        finally:
            super().close()

    def discard(self) -> None:
        if self.closed:
            return
        try:
            if isinstance(self._inner, EncryptedWriter):
                self._inner.discard()
            else:
                self._inner.close()
        finally:
            self._tmp.unlink(missing_ok=True)
            super().close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __del__(self) -> None:
        self.discard()
