"""The artifact store: datasets, checkpoints, model bundles and score files.

A local directory tree addressed by file:// URLs (the default). Every path is under
<root>/tenant-<id>/..., so one tenant's files never mix with another's.

With MEDMAAS_ARTIFACT_STORE=s3://bucket/prefix the store of record is that bucket
(app/storage.py) and URLs are s3:// ones; code still works on local paths under the root,
which is then this host's cache: `open_write` publishes a file to the bucket when it closes,
`open_read` fetches it when the local copy is missing or stale, and `exists`, `is_file`,
`listdir`, `glob`, `remove` and `fetch_tree` ask the bucket. Code that reads or tests artifact
files by other means than these must go through them, never through the local tree.

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
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Self
from urllib.parse import urlparse

from app.config import Settings, resolved
from app.crypto import HEADER_SIZE, DecryptionError, EncryptedReader, EncryptedWriter, Header, is_encrypted
from app.storage import ObjectStore

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer
    from werkzeug.wrappers import Response

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

    @property
    def remote(self) -> ObjectStore | None:
        """The object store of record behind this root (None: the local tree is the store)."""
        return _remotes.get(self.root)

    def url(self, path: Path) -> str:
        return url_of(path)

    def path(self, url: str) -> Path:
        """The local path of a file:// URL inside the store, or of an s3:// URL inside its
        object store (anything else is refused)."""
        parsed = urlparse(url)
        if parsed.scheme == "s3" and self.remote is not None:
            return self.remote.path_of_url(url)
        if parsed.scheme != "file":
            raise ValueError(f"unsupported artifact URL {url!r}")
        path = Path(parsed.path).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"artifact URL outside the store: {url!r}")
        return path

    @staticmethod
    def remove(path: Path) -> None:
        remove(path)


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


# -- the object store of record (MEDMAAS_ARTIFACT_STORE) --------------------------------

_remotes: dict[Path, ObjectStore] = {}  # artifact root -> the object store it caches


def _configure_remote(settings: Settings, root: Path) -> None:
    current = _remotes.get(root)
    if not settings.artifact_store or settings.artifact_store.startswith("file://"):
        _remotes.pop(root, None)
        return
    if current is not None and (current.url, current.endpoint_url) == (
        ObjectStore(settings.artifact_store, root).url,
        settings.s3_endpoint_url,
    ):
        return
    _remotes[root] = remote = ObjectStore(settings.artifact_store, root, settings.s3_endpoint_url)
    remote.start_sweeper(settings.s3_cache_max_age_s)


def remote_of(path: str | os.PathLike[str]) -> ObjectStore | None:
    """The object store that holds the artifact at `path`, None when the local tree does."""
    if not _remotes:
        return None
    resolved = Path(path).resolve()
    for root, remote in list(_remotes.items()):
        if resolved.is_relative_to(root):
            return remote
    return None


def url_of(path: str | os.PathLike[str]) -> str:
    """The URL rows store for an artifact: s3://... in an object store, else file://..."""
    remote = remote_of(path)
    return remote.url_of(Path(path)) if remote is not None else Path(path).resolve().as_uri()


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether the artifact file or directory exists (in the store of record)."""
    remote = remote_of(path)
    return remote.exists(Path(path)) if remote is not None else Path(path).exists()


def is_file(path: str | os.PathLike[str]) -> bool:
    remote = remote_of(path)
    return remote.is_file(Path(path)) if remote is not None else Path(path).is_file()


def is_dir(path: str | os.PathLike[str]) -> bool:
    remote = remote_of(path)
    return remote.is_dir(Path(path)) if remote is not None else Path(path).is_dir()


def listdir(path: str | os.PathLike[str]) -> list[Path]:
    """The entries directly in an artifact directory (none when it does not exist), sorted."""
    remote = remote_of(path)
    if remote is not None:
        return remote.listdir(Path(path))
    try:
        return sorted(Path(path).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def glob(path: str | os.PathLike[str], pattern: str) -> list[Path]:
    """The entries of an artifact directory whose names match `pattern` (fnmatch), sorted."""
    remote = remote_of(path)
    return remote.glob(Path(path), pattern) if remote is not None else sorted(Path(path).glob(pattern))


def fetch(path: str | os.PathLike[str]) -> Path:
    """The artifact's local path, its file made current first (for code that opens it by
    path rather than with open_read; on the local store it is the path as it is)."""
    remote = remote_of(path)
    return remote.fetch(Path(path)) if remote is not None else Path(path)


def fetch_tree(path: str | os.PathLike[str]) -> Path:
    """A directory of artifacts (a model bundle) made current locally; its local path."""
    remote = remote_of(path)
    return remote.fetch_tree(Path(path)) if remote is not None else Path(path)


def publish(path: str | os.PathLike[str]) -> None:
    """Publish a file written in place by other means than open_write (no-op locally)."""
    remote = remote_of(path)
    if remote is not None:
        remote.publish(Path(path))


_still: dict[Path, float] = {}  # path -> when the object store last had it (still_exists)


def still_exists(path: str | os.PathLike[str], max_age_s: float = 5.0) -> bool:
    """Whether an artifact (a loaded model's bundle) still exists, for a check made on every
    call: from an object store, an answer up to max_age_s old may be reused."""
    remote = remote_of(path)
    if remote is None:
        return Path(path).exists()
    resolved, now = Path(path).resolve(), time.monotonic()
    if now - _still.get(resolved, -max_age_s - 1) <= max_age_s:
        return True
    if remote.exists(resolved):
        _still[resolved] = now
        return True
    _still.pop(resolved, None)
    return False


def open_stream(path: str | os.PathLike[str]) -> io.BufferedReader:
    """Like open_read, but from an object store the plaintext is streamed from the object
    instead of being fetched whole into this host's cache first (for one-off reads of big files)."""
    remote = remote_of(path)
    if remote is None:
        return open_read(path)
    return _reader(Path(path).resolve(), remote.open(Path(path)))


def remove(path: str | os.PathLike[str]) -> None:
    """Delete an artifact file or directory (from the store of record, and this host)."""
    remote = remote_of(path)
    if remote is not None:
        remote.remove(Path(path))
        return
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


# -- encryption at rest ------------------------------------------------------------

_keyrings: dict[Path, Keyring] = {}  # artifact root -> the keyring its files use
_keyrings_lock = threading.Lock()


def configure(settings: Settings) -> None:
    """Encrypt files under settings' artifact root when it has an encryption key (cheap
    when nothing changed, so callers just call it before touching files)."""
    root = resolved(settings.artifacts)
    with _keyrings_lock:
        _configure_remote(settings, root)
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
    path = fetch(Path(path).resolve())
    return _reader(path, open(path, "rb", buffering=0))


def _reader(path: Path, fh: io.RawIOBase | IO[bytes]) -> io.BufferedReader:
    """open_read's reader over `fh`, the raw bytes of the artifact at `path`."""
    try:
        encrypted = is_encrypted(fh.read(HEADER_SIZE))
        fh.seek(0)
        if not encrypted:
            return io.BufferedReader(fh)  # type: ignore[arg-type]
        found = _keyring_of(path)
        if found is None:
            raise DecryptionError(f"{path.name} is encrypted; set MEDMAAS_ENCRYPTION_KEY to read it")
        keyring, tenant_id, binding = found

        def key_for(header: Header) -> bytes:
            if header.tenant_id != tenant_id:
                raise DecryptionError(f"{path.name} belongs to tenant {header.tenant_id}, not {tenant_id}")
            return keyring.for_read(tenant_id, header.key_id)

        reader = EncryptedReader(fh, key_for, binding)  # type: ignore[arg-type]
    except BaseException:
        fh.close()
        raise
    return io.BufferedReader(reader, buffer_size=reader.header.segment)


def plaintext_size(path: str | os.PathLike[str]) -> int:
    """The size of what open_read returns (without decrypting anything but the last segment)."""
    with open_read(path) as fh:
        return fh.seek(0, io.SEEK_END)


def sendable(path: Path) -> Path | io.BufferedReader:
    """What a download sends: a plain local file by its path (ranges, ETag), an encrypted
    one as a stream of its plaintext; from an object store, a stream read from it."""
    if remote_of(path) is not None:
        return open_stream(path)
    with open(path, "rb") as fh:
        if not is_encrypted(fh.read(HEADER_SIZE)):
            return path
    return open_read(path)


def send_artifact(
    path: Path, settings: Settings | None = None, *, download_name: str | None = None, **kwargs: Any
) -> Response:
    """A Flask response downloading the artifact at `path` (flask.send_file's keywords).
    From an object store it streams from the store, or, with MEDMAAS_S3_PRESIGNED_DOWNLOADS
    and a plaintext file, redirects to a presigned URL of the object."""
    from flask import redirect, send_file

    remote = remote_of(path)
    if (
        remote is not None
        and settings is not None
        and settings.s3_presigned_downloads
        and not is_encrypted(remote.head(path, HEADER_SIZE))  # ciphertext is streamed, decrypted
    ):
        name = download_name if kwargs.get("as_attachment") else None
        return redirect(remote.presign(path, settings.s3_presign_expiry_s, name), 302)
    return send_file(sendable(path), download_name=download_name or Path(path).name, **kwargs)


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
            remote = remote_of(self.path)
            if remote is None:
                os.replace(self._tmp, self.path)
            else:  # write-through: in the store before it appears here
                etag = remote.upload(self._tmp, self.path)
                os.replace(self._tmp, self.path)
                remote.mark_current(self.path, etag)
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
