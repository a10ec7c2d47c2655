"""The checks an upload of text (sequences, libraries) gets before it is accepted, in time
bounded by the bytes received, for uploads too large to parse in the request.

    head = read_head(path, "big.csv.gz", inline_max_bytes)
    if head.whole: parse it now
    else: check_head(kind, head, ...) (4xx on a bad header, options or first rows), then
          leave the full parse to a worker

A gzip file can expand without bound, so it counts as small only when it expands to no
more than ``inline_max_bytes``; that is measured by decompressing at most that many bytes.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.artifacts import open_read

from .common import IngestLimits
from .errors import IngestError
from .textio import GZIP_MAGIC, base_name, open_binary, open_checked

# The start of the uncompressed text parsed at submit with the same code as the whole file:
# enough for the header and the first rows, cheap enough to answer in well under a second.
HEAD_BYTES = 64 * 1024
HEAD_LINES = 1000
# Errors a complete parse may find that the first rows alone cannot decide.
_WHOLE_FILE_ONLY = frozenset({"no_valid_rows", "no_rows", "empty_file"})


@dataclass(frozen=True)
class Head:
    compressed: bool
    text: bytes  # the first HEAD_LINES whole lines of the first HEAD_BYTES of uncompressed text
    whole: bool  # the file expands to no more than the inline limit (parse it in the request)


def read_head(path: str, filename: str, inline_max_bytes: int) -> Head:
    """Sniff the stored upload (IngestError for binary data, other archives, a .gz that is
    not gzip) and read the start of its text; a gzip file is decompressed up to
    ``inline_max_bytes`` + 1 bytes to tell whether it is small."""
    compressed = open_checked(path, filename)
    limit = inline_max_bytes if compressed else HEAD_BYTES
    head = bytearray()
    expanded = 0
    with open_binary(path, compressed) as fp:
        try:
            while expanded <= limit:
                chunk = fp.read(min(1 << 20, limit + 1 - expanded))
                if not chunk:
                    break
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                expanded += len(chunk)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise IngestError("corrupt_gzip", f"the gzip stream is corrupt or truncated: {exc}") from None
    whole = expanded <= inline_max_bytes if compressed else os.path.getsize(path) <= inline_max_bytes
    if len(head) == HEAD_BYTES and expanded > HEAD_BYTES:
        cut = head.rfind(b"\n")
        head = head[: cut + 1] if cut >= 0 else bytearray()
    return Head(compressed, _first_lines(bytes(head), HEAD_LINES), whole)


def _first_lines(text: bytes, n: int) -> bytes:
    end = -1
    for _ in range(n):
        end = text.find(b"\n", end + 1)
        if end < 0:
            return text
    return text[: end + 1]


def text_size(path: str) -> int | None:
    """The uncompressed size of a stored text upload, for progress: its size, or for gzip the
    size its trailer records (that of the last member, modulo 4 GiB: an estimate)."""
    with open_read(path) as f:
        magic = f.read(len(GZIP_MAGIC))
        end = f.seek(0, io.SEEK_END)
        if magic != GZIP_MAGIC:
            return end
        if end < 18:  # smaller than a gzip header and trailer
            return None
        f.seek(end - 4)
        return int.from_bytes(f.read(4), "little") or None


def check_head(
    kind: str,
    head: Head,
    filename: str,
    work_dir: str,
    options: Mapping[str, Any],
    limits: IngestLimits,
) -> None:
    """Parse the head of a large upload as if it were the whole file (under ``work_dir``, a
    scratch directory): IngestError for what the first rows already show is wrong (unknown
    options, a missing column, a corrupt first line...), nothing for what only the whole
    file can tell (no valid rows at all)."""
    from app.ingest import ingest

    if not head.text:  # the first line is longer than HEAD_BYTES: the worker checks it
        return
    name = base_name(filename) or "upload"
    sample = os.path.join(work_dir, name)
    with open(sample, "wb") as f:
        f.write(head.text)
    try:
        ingest(kind, sample, name, os.path.join(work_dir, "out"), options, limits)
    except IngestError as exc:
        if exc.code not in _WHOLE_FILE_ONLY:
            raise
