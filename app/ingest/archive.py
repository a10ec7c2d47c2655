"""Safe zip handling: check every entry before extracting anything, count bytes while
extracting, and never write outside the destination directory."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from .common import IngestLimits
from .errors import IngestError, too_large

_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ZipEntry:
    info: zipfile.ZipInfo
    name: str  # normalised relative POSIX path
    is_dir: bool
    position: int  # 1-based place in the archive's directory, how messages name the entry


@dataclass(frozen=True)
class ExtractedFile:
    name: str  # normalised relative POSIX path inside the archive
    path: str  # where it was written ("" when rejected)
    size: int
    position: int  # 1-based place in the archive
    rewritten: bool = False  # passed through the rewrite hook
    rejected: str | None = None  # why the rewrite hook left it out (nothing written)


class MemberRejected(Exception):
    """Raised by a rewrite to leave one member out: reported on its ExtractedFile, not fatal."""


# rewrite(name, first bytes, declared size): a function from the member's bytes to the bytes
# to write (the member is then read into memory and never written as it was), or None.
Rewrite = Callable[[str, bytes, int], Callable[[bytes], bytes] | None]


def open_zip(path: str | IO[bytes], what: str = "zip archive") -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise IngestError("invalid_archive", f"the file is not a readable {what}: {exc}") from None


def _normalise(raw: str, position: int) -> str:
    # Entries are named by position, never by name: file names often carry a patient's name.
    if "\x00" in raw:
        raise IngestError("unsafe_archive", f"archive entry {position} has a NUL byte in its name", {"entry": position})
    # Some Windows tools write backslashes; treat them as separators so '..\\x' is caught.
    name = raw.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise IngestError("unsafe_archive", f"archive entry {position} has an absolute path", {"entry": position})
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise IngestError(
            "unsafe_archive", f"archive entry {position} points outside the archive ('..')", {"entry": position}
        )
    return "/".join(parts)


def check_zip(zf: zipfile.ZipFile, limits: IngestLimits | None = None, check_ratio: bool = True) -> list[ZipEntry]:
    """Validate every entry's name, type and declared size; raise IngestError on the first problem."""
    limits = IngestLimits.of(limits)
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise too_large(
            "too_many_members",
            f"archive has {len(infos)} entries; the limit is {limits.max_members}",
            {"members": len(infos), "max_members": limits.max_members},
        )
    entries: list[ZipEntry] = []
    files: dict[str, int] = {}
    dirs: set[str] = set()
    total = 0
    for position, info in enumerate(infos, 1):
        name = _normalise(info.filename, position)
        mode = info.external_attr >> 16
        where = {"entry": position}
        if stat.S_ISLNK(mode):
            raise IngestError(
                "unsafe_archive", f"archive entry {position} is a symbolic link; links are not allowed", where
            )
        # the high bits are a Unix mode only for archives made on Unix
        if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise IngestError("unsafe_archive", f"archive entry {position} is not a regular file", where)
        if info.flag_bits & 0x1:
            raise IngestError(
                "encrypted_archive", f"archive entry {position} is encrypted; upload an unencrypted zip", where
            )
        is_dir = info.is_dir() or stat.S_ISDIR(mode)
        if not name:
            if is_dir:
                continue
            raise IngestError("unsafe_archive", f"archive entry {position} has no file name", where)
        if is_dir:
            dirs.add(name)
        else:
            if name in files:
                raise IngestError(
                    "unsafe_archive",
                    f"archive entries {files[name]} and {position} have the same name",
                    {"entry": position, "same_as": files[name]},
                )
            files[name] = position
            parts = name.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            total += info.file_size
            if total > limits.max_bytes:
                raise too_large(
                    "archive_too_large",
                    f"archive expands to more than {limits.max_bytes} bytes (the uncompressed size limit)",
                    {"max_bytes": limits.max_bytes},
                )
            if check_ratio:
                _check_ratio(position, info.file_size, info.compress_size, limits)
        entries.append(ZipEntry(info, name, is_dir, position))
    clash = set(files) & dirs
    if clash:
        position = files[sorted(clash)[0]]
        raise IngestError(
            "unsafe_archive", f"archive entry {position} is both a file and a folder", {"entry": position}
        )
    return entries


def _check_ratio(position: int, size: int, compressed: int, limits: IngestLimits) -> None:
    if size > limits.ratio_min_bytes and size > limits.max_ratio * max(compressed, 1):
        raise IngestError(
            "zip_bomb",
            f"archive entry {position} expands {size / max(compressed, 1):.0f}-fold "
            f"({compressed} to {size} bytes); the limit is {limits.max_ratio:.0f}-fold",
            {"entry": position, "compressed": compressed, "size": size},
        )


def extract_zip(
    path: str | IO[bytes],
    dest: str,
    limits: IngestLimits | None = None,
    skip: Callable[[str], bool] | None = None,
    *,
    flat: bool = False,
    rewrite: Rewrite | None = None,
) -> list[ExtractedFile]:
    """Extract the regular files of a zip into ``dest`` after check_zip passes.

    ``skip(name)`` can leave entries out (e.g. ``__MACOSX/`` metadata). ``flat``: write
    each file as ``dest/<position>``, so no name from the archive reaches the disk.
    ``rewrite`` (see Rewrite) transforms chosen members in memory before anything of them
    is written; it raises MemberRejected to leave one out. On any other error the files
    written so far are removed and IngestError is raised.
    """
    limits = IngestLimits.of(limits)
    dest = os.path.realpath(dest)
    os.makedirs(dest, exist_ok=True)
    written: list[str] = []
    made_dirs: list[str] = []
    out: list[ExtractedFile] = []
    counter = _Counter(limits)
    try:
        with open_zip(path) as zf:
            for entry in check_zip(zf, limits):
                if entry.is_dir or (skip is not None and skip(entry.name)):
                    continue
                with zf.open(entry.info) as src:
                    chunks = counter.chunks(src, entry)
                    first = next(chunks, b"")
                    try:
                        transform = rewrite(entry.name, first, entry.info.file_size) if rewrite else None
                        if transform is not None:
                            data = transform(first + b"".join(chunks))
                    except MemberRejected as why:
                        out.append(ExtractedFile(entry.name, "", 0, entry.position, True, str(why)))
                        continue
                    chunks = iter((data,)) if transform is not None else itertools.chain((first,), chunks)
                    target = _target(dest, entry, flat, made_dirs)
                    # O_EXCL|O_NOFOLLOW: never follow or overwrite something already there.
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                    written.append(target)
                    size = 0
                    with os.fdopen(fd, "wb") as dst:
                        for chunk in chunks:
                            dst.write(chunk)
                            size += len(chunk)
                out.append(ExtractedFile(entry.name, target, size, entry.position, transform is not None))
    except IngestError:
        _cleanup(written, made_dirs)
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        _cleanup(written, made_dirs)
        raise IngestError(
            "corrupt_archive", f"the zip archive is corrupt or uses an unsupported feature: {exc}"
        ) from None
    except OSError as exc:
        _cleanup(written, made_dirs)
        raise IngestError("invalid_archive", f"could not extract the zip archive: {exc.strerror or exc}") from None
    return out


class _Counter:
    """Reads members chunk by chunk, enforcing the limits on the bytes actually produced
    (headers can lie)."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.total = 0

    def chunks(self, src: IO[bytes], entry: ZipEntry) -> Iterator[bytes]:
        size = 0
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            self.total += len(chunk)
            if size > entry.info.file_size:
                raise IngestError(
                    "corrupt_archive",
                    f"archive entry {entry.position} is larger than its header says",
                    {"entry": entry.position},
                )
            if self.total > self.limits.max_bytes:
                raise too_large("archive_too_large", f"archive expands to more than {self.limits.max_bytes} bytes")
            _check_ratio(entry.position, size, entry.info.compress_size, self.limits)
            yield chunk


def _target(dest: str, entry: ZipEntry, flat: bool, made_dirs: list[str]) -> str:
    if flat:
        return os.path.join(dest, f"{entry.position:07d}")
    target = os.path.join(dest, *entry.name.split("/"))
    parent = os.path.dirname(target)
    _makedirs(parent, dest, made_dirs)
    real = os.path.realpath(parent)
    if real != dest and not real.startswith(dest + os.sep):
        raise IngestError("unsafe_archive", f"archive entry {entry.position} escapes the target folder")
    return target


def _makedirs(path: str, root: str, made: list[str]) -> None:
    missing = []
    while not os.path.isdir(path) and path != root:
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d)
        made.append(d)


def _cleanup(files: list[str], dirs: list[str]) -> None:
    for f in files:
        with contextlib.suppress(OSError):
            os.unlink(f)
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            os.rmdir(d)
