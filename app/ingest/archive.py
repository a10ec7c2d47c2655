"""Safe zip handling: check every entry before extracting anything, count bytes while
extracting, and never write outside the destination directory."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .common import IngestLimits
from .errors import IngestError, too_large

_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ZipEntry:
    info: zipfile.ZipInfo
    name: str  # normalised relative POSIX path
    is_dir: bool


@dataclass(frozen=True)
class ExtractedFile:
    name: str  # normalised relative POSIX path inside the archive
    path: str  # where it was written
    size: int


def open_zip(path: str, what: str = "zip archive") -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise IngestError("invalid_archive", f"the file is not a readable {what}: {exc}") from None


def _normalise(raw: str) -> str:
    if "\x00" in raw:
        raise IngestError("unsafe_archive", f"archive entry {raw!r} has a NUL byte in its name")
    # Some Windows tools write backslashes; treat them as separators so '..\\x' is caught.
    name = raw.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise IngestError("unsafe_archive", f"archive entry {raw!r} has an absolute path", {"entry": raw})
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise IngestError("unsafe_archive", f"archive entry {raw!r} points outside the archive ('..')", {"entry": raw})
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
    files: set[str] = set()
    dirs: set[str] = set()
    total = 0
    for info in infos:
        name = _normalise(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise IngestError(
                "unsafe_archive",
                f"archive entry {info.filename!r} is a symbolic link; links are not allowed",
                {"entry": info.filename},
            )
        # the high bits are a Unix mode only for archives made on Unix
        if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise IngestError(
                "unsafe_archive", f"archive entry {info.filename!r} is not a regular file", {"entry": info.filename}
            )
        if info.flag_bits & 0x1:
            raise IngestError(
                "encrypted_archive", f"archive entry {info.filename!r} is encrypted; upload an unencrypted zip"
            )
        is_dir = info.is_dir() or stat.S_ISDIR(mode)
        if not name:
            if is_dir:
                continue
            raise IngestError("unsafe_archive", f"archive entry {info.filename!r} has no file name")
        if is_dir:
            dirs.add(name)
        else:
            if name in files:
                raise IngestError("unsafe_archive", f"archive has two entries named {name!r}", {"entry": name})
            files.add(name)
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
                _check_ratio(info.filename, info.file_size, info.compress_size, limits)
        entries.append(ZipEntry(info, name, is_dir))
    clash = files & dirs
    if clash:
        name = sorted(clash)[0]
        raise IngestError("unsafe_archive", f"archive entry {name!r} is both a file and a folder", {"entry": name})
    return entries


def _check_ratio(name: str, size: int, compressed: int, limits: IngestLimits) -> None:
    if size > limits.ratio_min_bytes and size > limits.max_ratio * max(compressed, 1):
        raise IngestError(
            "zip_bomb",
            f"archive entry {name!r} expands {size / max(compressed, 1):.0f}-fold "
            f"({compressed} to {size} bytes); the limit is {limits.max_ratio:.0f}-fold",
            {"entry": name, "compressed": compressed, "size": size},
        )


def extract_zip(
    path: str, dest: str, limits: IngestLimits | None = None, skip: Callable[[str], bool] | None = None
) -> list[ExtractedFile]:
    """Extract the regular files of a zip into ``dest`` after check_zip passes.

    ``skip(name)`` can leave entries out (e.g. ``__MACOSX/`` metadata). On any error the
    files written so far are removed and IngestError is raised.
    """
    limits = IngestLimits.of(limits)
    dest = os.path.realpath(dest)
    os.makedirs(dest, exist_ok=True)
    written: list[str] = []
    made_dirs: list[str] = []
    out: list[ExtractedFile] = []
    total = 0
    try:
        with open_zip(path) as zf:
            for entry in check_zip(zf, limits):
                if entry.is_dir or (skip is not None and skip(entry.name)):
                    continue
                target = os.path.join(dest, *entry.name.split("/"))
                parent = os.path.dirname(target)
                _makedirs(parent, dest, made_dirs)
                real = os.path.realpath(parent)
                if real != dest and not real.startswith(dest + os.sep):
                    raise IngestError("unsafe_archive", f"archive entry {entry.name!r} escapes the target folder")
                # O_EXCL|O_NOFOLLOW: never follow or overwrite something already there.
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                written.append(target)
                size = 0
                info = entry.info
                with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        total += len(chunk)
                        # Headers can lie: enforce the limits on the bytes actually produced.
                        if size > info.file_size:
                            raise IngestError(
                                "corrupt_archive", f"archive entry {entry.name!r} is larger than its header says"
                            )
                        if total > limits.max_bytes:
                            raise too_large(
                                "archive_too_large", f"archive expands to more than {limits.max_bytes} bytes"
                            )
                        _check_ratio(entry.name, size, info.compress_size, limits)
                        dst.write(chunk)
                out.append(ExtractedFile(entry.name, target, size))
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
