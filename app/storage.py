"""The object store of record behind the artifact directory (MEDMAAS_ARTIFACT_STORE=s3://...).

With an S3 store (AWS S3, MinIO, Ceph; s3fs), the local artifact root is only this host's
cache and scratch: a file's key is its path under the root (`tenant-<id>/...`), under the
store's prefix. Writers publish to the store when they close (app.artifacts.open_write);
readers use a local copy while it is current and fetch it otherwise. "Current" is decided by
the object's ETag, recorded beside the copy (under <root>/.store-cache/) when this host
fetched or wrote it, so a file another host rewrote (a checkpoint after a takeover) is
fetched again. Existence checks, listings and deletions ask the store, never the local tree.
A daemon thread per process drops copies unused for MEDMAAS_S3_CACHE_MAX_AGE_S and copies of
objects erased through another host.

Credentials come from the usual AWS environment variables or profile (botocore's chain);
the endpoint from MEDMAAS_S3_ENDPOINT_URL, else botocore's own AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CACHE_META = ".store-cache"  # under the local root: the ETag of each local copy (its mtime: last used)

log = logging.getLogger(__name__)


def parse_store_url(url: str) -> tuple[str, str] | None:
    """(bucket, prefix) of an s3:// URL; None for "" or file:// (the local store). Anything
    else is a ValueError naming the setting."""
    if not url or url.startswith("file://"):
        return None
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"MEDMAAS_ARTIFACT_STORE must be file:// or s3://bucket[/prefix], not {url!r}")
    return parsed.netloc, parsed.path.strip("/")


class ObjectStore:
    """One S3 bucket/prefix mirrored by one local root."""

    def __init__(self, url: str, root: Path, endpoint_url: str = "") -> None:
        found = parse_store_url(url)
        if found is None:
            raise ValueError(f"not an object store URL: {url!r}")
        bucket, prefix = found
        self.root = Path(root).resolve()
        self.base = f"{bucket}/{prefix}" if prefix else bucket
        self.url = f"s3://{self.base}"
        self.endpoint_url = endpoint_url
        self._fs: Any = None
        self._pid = -1
        self._sweeper: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        """The s3fs file system, made again in a forked child (its event loop is per process)."""
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                import s3fs

                self._fs = s3fs.S3FileSystem(
                    endpoint_url=self.endpoint_url or None, use_listings_cache=False, skip_instance_cache=True
                )
                self._pid = os.getpid()
            return self._fs

    # -- names -----------------------------------------------------------------------
    def key(self, path: Path) -> str:
        rel = Path(path).resolve().relative_to(self.root).as_posix()
        return self.base if rel == "." else f"{self.base}/{rel}"

    def path_of(self, key: str) -> Path:
        key = key.strip("/")
        if key != self.base and not key.startswith(self.base + "/"):
            raise ValueError(f"object {key!r} is outside the store {self.url}")
        return self.root.joinpath(key[len(self.base) + 1 :]) if key != self.base else self.root

    def url_of(self, path: Path) -> str:
        return f"s3://{self.key(path)}"

    def path_of_url(self, url: str) -> Path:
        parsed = urlparse(url)
        if parsed.scheme != "s3":
            raise ValueError(f"not an s3:// URL: {url!r}")
        path = self.path_of(f"{parsed.netloc}{parsed.path}").resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"artifact URL outside the store: {url!r}")
        return path

    def _meta(self, path: Path) -> Path:
        return self.root / CACHE_META / Path(path).resolve().relative_to(self.root)

    # -- queries -----------------------------------------------------------------------
    def info(self, path: Path) -> dict[str, Any] | None:
        try:
            return dict(self.fs.info(self.key(path)))
        except FileNotFoundError:
            return None

    def exists(self, path: Path) -> bool:
        return bool(self.fs.exists(self.key(path)))

    def is_file(self, path: Path) -> bool:
        info = self.info(path)
        return info is not None and info.get("type") == "file"

    def is_dir(self, path: Path) -> bool:
        info = self.info(path)
        return info is not None and info.get("type") == "directory"

    def listdir(self, path: Path) -> list[Path]:
        """The direct children (files and "directories") of `path`, as local paths."""
        try:
            keys = self.fs.ls(self.key(path), detail=False)
        except FileNotFoundError:
            return []
        own = self.key(path)
        return sorted(self.path_of(k) for k in keys if k.strip("/") != own)

    def glob(self, path: Path, pattern: str) -> list[Path]:
        return [p for p in self.listdir(path) if fnmatch.fnmatchcase(p.name, pattern)]

    def files(self, path: Path) -> dict[Path, dict[str, Any]]:
        """Every file under `path` (recursively), with its object info."""
        try:
            found = self.fs.find(self.key(path), detail=True)
        except FileNotFoundError:
            return {}
        return {self.path_of(k): dict(v) for k, v in found.items() if v.get("type") == "file"}

    def tree_bytes(self, path: Path, skip: frozenset[str] = frozenset()) -> int:
        """Bytes stored under `path`, leaving out files under a directory named in skip (at any depth)."""
        base = Path(path).resolve()
        return sum(
            int(v.get("size") or 0)
            for p, v in self.files(base).items()
            if not skip & set(p.relative_to(base).parts[:-1])
        )

    # -- transfers -----------------------------------------------------------------------
    def upload(self, local: Path, path: Path) -> str:
        """Publish the local file `local` as the object of `path` (multipart from disk when
        large); returns the object's ETag, for mark_current once `path` holds those bytes."""
        key = self.key(path)
        self._meta(path).unlink(missing_ok=True)
        self.fs.put_file(str(local), key)
        return str(self.fs.info(key).get("ETag") or "")

    def mark_current(self, path: Path, etag: str) -> None:
        """Record the local copy of `path` as holding the object with this ETag."""
        self._write_meta(path, etag)

    def publish(self, path: Path) -> None:
        """Upload a file written in place by other means than open_write."""
        self.mark_current(path, self.upload(path, path))

    def _write_meta(self, path: Path, etag: str) -> None:
        if not etag:
            return
        meta = self._meta(path)
        meta.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_name(f".{meta.name}.{uuid.uuid4().hex[:12]}.tmp")
        tmp.write_text(etag)
        os.replace(tmp, meta)

    def _read_meta(self, path: Path) -> str | None:
        try:
            return self._meta(path).read_text()
        except OSError:
            return None

    def fetch(self, path: Path, info: dict[str, Any] | None = None) -> Path:
        """Make the local copy of `path` current (downloading it when it is missing or stale);
        FileNotFoundError (and the stale copy removed) when the store has no such file."""
        path = Path(path).resolve()
        if info is None:
            info = self.info(path)
        if info is None or info.get("type") != "file":
            self.drop_local(path)
            raise FileNotFoundError(f"{self.url_of(path)} is not in the artifact store")
        etag = str(info.get("ETag") or "")
        if etag and path.is_file() and self._read_meta(path) == etag:
            with contextlib.suppress(OSError):
                os.utime(self._meta(path))  # last used: the cache sweep keeps it a while longer
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.fetch")
        try:
            self.fs.get_file(self.key(path), str(tmp))
            self._meta(path).unlink(missing_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._write_meta(path, etag)
        return path

    def fetch_tree(self, path: Path) -> Path:
        """Make every file under `path` current locally (a model bundle before it is loaded)."""
        for file, info in self.files(path).items():
            self.fetch(file, info)
        return Path(path).resolve()

    def open(self, path: Path) -> Any:
        """A seekable binary stream of the object, read from the store in blocks."""
        return self.fs.open(self.key(path), "rb", block_size=8 * 1024 * 1024)

    def head(self, path: Path, size: int) -> bytes:
        """The object's first `size` bytes (one ranged GET)."""
        return bytes(self.fs.cat_file(self.key(path), start=0, end=size))

    def presign(self, path: Path, expires_s: int, download_name: str | None = None) -> str:
        params: dict[str, Any] = {}
        if download_name:
            params["ResponseContentDisposition"] = f'attachment; filename="{download_name}"'
        return str(self.fs.url(self.key(path), expires=expires_s, **params))

    # -- removal -----------------------------------------------------------------------
    def drop_local(self, path: Path) -> None:
        """Forget this host's copy of `path` (a file or a directory) and its ETags."""
        for local in (Path(path), self._meta(path)):
            if local.is_dir() and not local.is_symlink():
                shutil.rmtree(local, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    local.unlink()

    def remove(self, path: Path) -> None:
        """Delete `path` (a file, or everything under it) from the store and from this host."""
        key = self.key(path)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(key, recursive=True)
        self.drop_local(path)

    # -- this host's cache ----------------------------------------------------------------
    def sweep(self, max_age_s: float) -> int:
        """Drop local copies unused for max_age_s, and copies of objects no longer in the
        store (erased through another host). Only copies this cache recorded (fetched or
        written here) are touched. Returns how many went."""
        meta_root = self.root / CACHE_META
        if not meta_root.is_dir():
            return 0
        now, dropped = time.time(), 0
        tops = [p for p in meta_root.iterdir() if p.is_dir()]
        for top in tops:
            try:
                present = set(self.files(self.root / top.name))
            except OSError:
                continue  # the store is unreachable: keep everything until the next sweep
            for meta in top.rglob("*"):
                if not meta.is_file() or meta.name.startswith("."):
                    continue
                copy = self.root / meta.relative_to(meta_root)
                with contextlib.suppress(OSError):
                    if copy not in present or now - meta.stat().st_mtime > max_age_s:
                        copy.unlink(missing_ok=True)
                        meta.unlink(missing_ok=True)
                        dropped += 1
        return dropped

    def start_sweeper(self, max_age_s: float) -> None:
        """Sweep this host's cache now and then from a daemon thread (once per process)."""
        if max_age_s <= 0 or self._sweeper is not None:
            return
        interval = min(max(max_age_s / 4, 60.0), 3600.0)

        def run() -> None:
            while True:
                time.sleep(interval)
                try:
                    dropped = self.sweep(max_age_s)
                except Exception:
                    log.warning("sweeping the artifact cache %s failed", self.root, exc_info=True)
                else:
                    if dropped:
                        log.info("artifact cache %s: %d stale or erased copies dropped", self.root, dropped)

        self._sweeper = threading.Thread(target=run, name="medmaas-cache-sweep", daemon=True)
        self._sweeper.start()

    def put_bytes(self, path: Path, data: bytes) -> None:
        self.fs.pipe_file(self.key(path), data)

    def get_bytes(self, path: Path) -> bytes:
        return bytes(self.fs.cat_file(self.key(path)))
