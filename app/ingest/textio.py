"""Streaming access to (optionally gzip-compressed) delimited text files.

Every reader here works line by line with a cap on line length and on the total number
of uncompressed bytes, so a gzip bomb or a file without newlines cannot exhaust memory.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Never, Self, TextIO

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

from app.artifacts import open_read

from .common import IngestLimits
from .errors import IngestError, too_large

GZIP_MAGIC = b"\x1f\x8b"
_OTHER_MAGIC = {
    b"PK\x03\x04": "a zip archive",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
}
_EXT_DELIMITER = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


def is_gzip(path: str) -> bool:
    """True for gzip (by magic bytes, whatever the name); IngestError for other archive formats."""
    with open_read(path) as f:
        head = f.read(8)
    if head.startswith(GZIP_MAGIC):
        return True
    for magic, what in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise IngestError("unsupported_compression", f"the file is {what}; upload plain text or gzip (.gz)")
    return False


_SNIFF_BYTES = 64 * 1024
# C0 control characters that never occur in a text table (tab, newlines, form feed,
# vertical tab, escape and DOS end-of-file do occur and are not counted)
_CONTROL = frozenset(range(0x20)) - {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1A, 0x1B}


def open_checked(path: str, filename: str) -> bool:
    """Whether the upload is gzip, after checking that it is what its name says and that
    its (uncompressed) start is text: IngestError ``invalid_file`` for a file named .gz
    that is not gzip or for binary content, ``unsupported_compression`` for other archives."""
    name = os.path.basename(filename or "") or "the file"
    with open_read(path) as f:
        magic = f.read(8)
    for prefix, what in _OTHER_MAGIC.items():
        if magic.startswith(prefix):
            raise IngestError("unsupported_compression", f"{name} is {what}; upload plain text or gzip (.gz)")
    compressed = magic.startswith(GZIP_MAGIC)
    if not compressed and name.lower().endswith(".gz"):
        raise IngestError(
            "invalid_file",
            f"{name} is not a gzip file (it has no gzip header); upload it without the .gz suffix "
            "or compress it with gzip",
            {"filename": name},
        )
    with open_binary(path, compressed) as fp:
        try:
            head = fp.read(_SNIFF_BYTES)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
            raise IngestError(
                "corrupt_gzip" if isinstance(exc, EOFError) else "invalid_file",
                f"{name} is not a valid gzip file: {exc}",
                {"filename": name},
            ) from None
    problem = binary_content(head)
    if problem:
        raise IngestError(
            "invalid_file",
            f"{name} contains binary data, not text ({problem}); upload a CSV, TSV or SMILES text file",
            {"filename": name},
        )
    return compressed


def binary_content(head: bytes) -> str | None:
    """Why these leading bytes of a file are not text, or None when they look like text.

    Text is UTF-8 or another 8-bit encoding (Latin-1 from spreadsheets is accepted here
    and handled row by row later); binary data has NUL bytes, many control characters,
    or invalid UTF-8 with a high share of bytes >= 0x80.
    """
    if not head:
        return None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 encoded; save it as UTF-8"
    if b"\x00" in head:
        return "it has NUL bytes"
    control = sum(1 for b in head if b in _CONTROL)
    if control > max(1, len(head) // 100):
        return f"{control} control characters in the first {len(head)} bytes"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        truncated = exc.reason == "unexpected end of data" and exc.start >= len(head) - 3
        high = sum(1 for b in head if b >= 0x80)
        if not truncated and high * 10 > len(head) * 3:
            return "it is not UTF-8 text"
    return None


def open_binary(path: str, compressed: bool) -> io.BufferedIOBase:
    fp = open_read(path)
    return _GzipReader(fp) if compressed else fp


class _GzipReader(gzip.GzipFile):
    """A gzip stream that closes the file it reads (GzipFile leaves a given file open)."""

    def __init__(self, fp: io.BufferedIOBase) -> None:
        super().__init__(fileobj=fp, mode="rb")
        self._source = fp

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._source.close()


def base_name(filename: str) -> str:
    """The file name without a .gz suffix, lower-cased."""
    name = os.path.basename(filename or "").lower()
    return name[:-3] if name.endswith(".gz") else name


def iter_lines(
    fp: io.BufferedIOBase, limits: IngestLimits, offset: int = 0, lineno: int = 0
) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset in the uncompressed stream, raw line including its newline)."""
    cap = limits.max_line_bytes
    while True:
        try:
            line = fp.readline(cap + 1)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise IngestError(
                "corrupt_gzip", f"the gzip stream is corrupt or truncated after line {lineno}: {exc}"
            ) from None
        if not line:
            return
        lineno += 1
        if len(line) > cap:
            raise IngestError(
                "line_too_long",
                f"line {lineno} is longer than {cap} bytes; is this a text file with one record per line?",
                {"line": lineno, "max_line_bytes": cap},
            )
        if offset + len(line) > limits.max_bytes:
            raise too_large("file_too_large", f"the file expands to more than {limits.max_bytes} bytes")
        yield offset, line
        offset += len(line)


class _Guarded(io.RawIOBase):
    """A raw stream that enforces the line-length and total-size caps chunk by chunk, so that
    C-speed readers (TextIOWrapper, csv.reader) can consume untrusted files safely."""

    def __init__(self, fp: io.BufferedIOBase, limits: IngestLimits, offset: int) -> None:
        self._fp, self._cap, self._max = fp, limits.max_line_bytes, limits.max_bytes
        self._pos, self._run = offset, 0  # _run: bytes since the last newline

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._fp.close()
        super().close()

    def readinto(self, buf: WriteableBuffer) -> int:
        view = memoryview(buf).cast("B")
        try:
            data = self._fp.read(len(view))
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise IngestError("corrupt_gzip", f"the gzip stream is corrupt or truncated: {exc}") from None
        n = len(data)
        last = data.rfind(b"\n")
        if last < 0:
            self._run += n
        else:
            longest = self._run + data.find(b"\n")
            if n > self._cap:  # only then can a line lie wholly inside this chunk and be too long
                longest = max(longest, max(map(len, data[:last].split(b"\n"))))
            if longest > self._cap:
                self._line_too_long()
            self._run = n - last - 1
        if self._run > self._cap:
            self._line_too_long()
        self._pos += n
        if self._pos > self._max:
            raise too_large("file_too_large", f"the file expands to more than {self._max} bytes")
        view[:n] = data
        return n

    def _line_too_long(self) -> Never:
        raise IngestError(
            "line_too_long",
            f"a line near byte {self._pos} is longer than {self._cap} bytes; "
            "is this a text file with one record per line?",
            {"max_line_bytes": self._cap},
        )


def open_text(
    path: str, compressed: bool, limits: IngestLimits, offset: int = 0, errors: str = "replace", newline: str = ""
) -> TextIO:
    """A UTF-8 text stream starting at byte ``offset``, with the caps enforced. newline=''
    suits csv.reader; newline='\\n' splits lines exactly as iter_lines does."""
    fp = open_binary(path, compressed)
    try:
        fp.seek(offset)
    except BaseException:
        fp.close()
        raise
    raw = io.BufferedReader(_Guarded(fp, limits, offset), buffer_size=1 << 20)
    return io.TextIOWrapper(raw, encoding="utf-8", errors=errors, newline=newline)


class _LineFeed:
    """Decoded lines for csv.reader that remember where the next unread line starts."""

    __slots__ = ("_errors", "_lines", "lineno", "next_offset")

    def __init__(self, lines: Iterator[tuple[int, bytes]], offset: int, lineno: int, errors: str) -> None:
        self._lines, self.next_offset, self.lineno, self._errors = lines, offset, lineno, errors

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        offset, raw = next(self._lines)
        self.next_offset = offset + len(raw)
        self.lineno += 1
        return raw.decode("utf-8", self._errors)


def iter_records(
    fp: io.BufferedIOBase,
    delimiter: str,
    limits: IngestLimits,
    *,
    errors: str = "replace",
    offset: int = 0,
    lineno: int = 0,
) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (byte offset, 1-based line number, fields) of each non-blank CSV record.

    A quoted field may span lines; the offset is where the record starts. ``errors`` is the
    UTF-8 decoding policy ('surrogateescape' lets the caller spot undecodable bytes).
    """
    feed = _LineFeed(iter_lines(fp, limits, offset, lineno), offset, lineno, errors)
    reader = csv.reader(feed, delimiter=delimiter)
    while True:
        start, line = feed.next_offset, feed.lineno + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise IngestError("invalid_csv", f"CSV syntax error at line {line}: {exc}", {"line": line}) from None
        if fields:
            if start == 0 and fields[0].startswith("\ufeff"):
                fields[0] = fields[0][1:]
            yield start, line, fields


def first_line(path: str, compressed: bool, limits: IngestLimits) -> str:
    with open_binary(path, compressed) as fp:
        for _, raw in iter_lines(fp, limits):
            text = raw.decode("utf-8", "replace").lstrip("\ufeff")
            if text.strip():
                return text
    raise IngestError("empty_file", "the file is empty")


def detect_delimiter(header: str, filename: str, override: str | None = None) -> str:
    """The delimiter: the option, else the extension's if the header uses it, else the commonest."""
    if override:
        return {"tab": "\t", "\\t": "\t", "comma": ","}.get(override, override)
    ext = os.path.splitext(base_name(filename))[1]
    by_ext = _EXT_DELIMITER.get(ext)
    counts = {d: header.count(d) for d in (",", "\t", ";", "|")}
    if by_ext and counts[by_ext]:
        return by_ext
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else (by_ext or ",")


def delimiter_name(delimiter: str) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "space"}.get(delimiter, repr(delimiter))
