"""Dataset ingestion and validation: pure functions over file paths (no Flask, no DB),
used by the upload endpoint and by workers. Everything streams.

    report = ingest("sequences", "/uploads/abc", "train.csv.gz", "/artifacts/ds/42", {"text_column": "smiles"})

raises IngestError (``code``, ``message``, ``details``, ``http_status`` 422 or 413) for an
upload that cannot be accepted; invalid rows inside an acceptable upload are counted and
sampled in the report instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import IO, Any

from .common import MIN_DATASET_ROWS, IngestLimits, IngestReport
from .errors import IngestError
from .images import ingest_images
from .library import ingest_library, iter_library_rows, library_row_offsets
from .sequences import ingest_sequences

KINDS = ("images", "sequences", "library")

__all__ = [
    "KINDS",
    "MIN_DATASET_ROWS",
    "IngestError",
    "IngestLimits",
    "IngestReport",
    "ingest",
    "ingest_images",
    "ingest_library",
    "ingest_sequences",
    "iter_library_rows",
    "library_row_offsets",
]


def ingest(
    kind: str,
    path: str | IO[bytes],
    original_filename: str,
    work_dir: str,
    options: Mapping[str, Any] | None = None,
    limits: IngestLimits | Mapping[str, Any] | None = None,
    deid_seed: str | None = None,
    scratch_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Validate the uploaded file at ``path`` and, for images and sequences, write the
    normalised dataset under ``work_dir`` (``data.npz`` or ``data.parquet``). Images may
    come as an open binary file; their DICOM files are de-identified with ``deid_seed``
    (app.ingest.deid.tenant_seed). Image scratch (extracted members, decoded pixels) goes
    under ``scratch_dir`` (default: ``work_dir``). ``progress(rows, offset)``: see
    ingest_sequences (the only kind slow enough per row to need it)."""
    if kind == "images":
        report = ingest_images(path, original_filename, work_dir, limits, options, deid_seed, scratch_dir)
    elif not isinstance(path, str):
        raise TypeError(f"{kind} datasets are read from a file name")
    elif kind == "sequences":
        report = ingest_sequences(path, original_filename, work_dir, options, limits, progress)
    elif kind == "library":
        return ingest_library(path, original_filename, options, limits)
    else:
        raise IngestError("invalid_kind", f"unknown dataset kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if report.rows < MIN_DATASET_ROWS:
        report.warnings.insert(
            0,
            f"only {report.rows} valid row{'' if report.rows == 1 else 's'}: too few to train; "
            f"training needs at least {MIN_DATASET_ROWS}",
        )
    return report
