"""The library file a score job reads, and which of its columns hold the SMILES and ids.

Shards seek to their first row by byte offset (app.ingest.library.library_row_offsets).
That is free on a plain file; on gzip a seek decompresses everything before it, so shard k
of n would pay k/n of a full decompression and a whole job O(n^2/2) blocks. Measured on
the MOSES training set (1,584,663 rows, 10 MB gzip, 58 MB plain, 2-core VM): skipping to row
1.5M in the gzip stream takes 2.5 s, decompressing the whole file once takes 0.5 s. So the
parent job decompresses a gzip library once into its scratch directory (deleted when the
job ends; disk cost = the uncompressed size) and every shard seeks in that copy.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app import artifacts
from app.artifacts import open_read, open_write


def plain_copy_path(scratch: Path) -> Path:
    return scratch / "library.txt"


def source_for(upload: Path, schema: Mapping[str, Any], scratch: Path) -> tuple[Path, dict[str, Any]]:
    """(path, schema) shards read: the upload itself, or for gzip the decompressed copy."""
    if not schema.get("compressed"):
        return upload, dict(schema)
    return plain_copy_path(scratch), {**schema, "compressed": False}


def prepare_source(
    upload: Path, schema: Mapping[str, Any], scratch: Path, max_bytes: int
) -> tuple[Path, dict[str, Any], float | None]:
    """Like source_for, but writes the decompressed copy if it is missing (atomically, so a
    present copy is always complete). Returns (path, schema, seconds spent decompressing)."""
    path, plain_schema = source_for(upload, schema, scratch)
    if path == upload or artifacts.exists(path):
        return path, plain_schema, None
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open_read(upload) as raw, gzip.open(raw, "rb") as src, open_write(path) as dst:
        copied = 0
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            copied += len(chunk)
            if copied > max_bytes:
                raise ValueError(f"the library expands to more than {max_bytes} bytes")
            dst.write(chunk)
    return path, plain_schema, time.monotonic() - started


def remove_tree(path: Path) -> None:
    artifacts.remove(path)
