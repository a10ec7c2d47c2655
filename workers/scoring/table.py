"""The score table: one row per library row, in input order.

Columns: row (input row number from 0), id, smiles (as in the file), canonical_smiles,
one float column per model output, then the model's trust columns (Predictor.score_columns:
spread, interval bounds, nn_similarity as floats, in_domain as a boolean), valid, error. Shards write Parquet part files;
merge() concatenates them in shard order into the final Parquet file (and CSV when that
is the job's output), checking that every input row appears exactly once, and keeps a
running top-K, all in constant memory (one record batch at a time).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.artifacts import open_read, open_write
from app.kinds.score import csv_safe

FIXED_BEFORE = ("row", "id", "smiles", "canonical_smiles")
FIXED_AFTER = ("valid", "error")
ROW_GROUP_ROWS = 65_536


def score_columns(output_names: Sequence[str]) -> list[str]:
    """Model output names as column names; a name that clashes with a fixed column (or
    repeats) gets a `score_` prefix."""
    taken = set(FIXED_BEFORE) | set(FIXED_AFTER)
    cols = []
    for name in output_names:
        col = str(name)
        while col in taken:
            col = f"score_{col}"
        taken.add(col)
        cols.append(col)
    return cols


def table_schema(score_cols: Sequence[str], bool_cols: Collection[str] = ()) -> pa.Schema:
    """score_cols are float32 columns except those in bool_cols (flags such as in_domain)."""
    return pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.string()),
            ("smiles", pa.string()),
            ("canonical_smiles", pa.string()),
            *[(c, pa.bool_() if c in bool_cols else pa.float32()) for c in score_cols],
            ("valid", pa.bool_()),
            ("error", pa.string()),
        ]
    )


def build_batch(
    schema: pa.Schema,
    score_cols: Sequence[str],
    rows: Sequence[int],
    ids: Sequence[str | None],
    texts: Sequence[str],
    canon: Sequence[str | None],
    scores: np.ndarray,
    errors: Sequence[str | None],
) -> pa.RecordBatch:
    """scores: float32 [N, len(score_cols)], NaN where the row is invalid (stored as null);
    a boolean column of the schema takes its values as 0 / 1."""
    valid = np.fromiter((e is None for e in errors), dtype=bool, count=len(errors))
    invalid_mask = ~valid
    arrays = [
        pa.array(rows, pa.int64()),
        pa.array(ids, pa.string()),
        pa.array(texts, pa.string()),
        pa.array(canon, pa.string()),
    ]
    for j, col in enumerate(score_cols):
        if schema.field(col).type == pa.bool_():
            arrays.append(pa.array(scores[:, j] > 0.5, pa.bool_(), mask=invalid_mask))
        else:
            arrays.append(pa.array(scores[:, j], pa.float32(), mask=invalid_mask))
    arrays += [pa.array(valid, pa.bool_()), pa.array(errors, pa.string())]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class PartWriter:
    """A shard's Parquet part file; it appears at `path` on close() (open_write)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = Path(path), schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = open_write(self.path)
        self._writer = pq.ParquetWriter(self._sink, schema)
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        self.rows += batch.num_rows
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_batches(self._buffer, self.schema))
            self._buffer, self._buffered = [], 0

    def close(self) -> Path:
        self._flush()
        self._writer.close()
        self._sink.close()
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._sink.discard()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# -- top-K ---------------------------------------------------------------------------------


class TopK:
    """The k valid rows with the highest `column` (ties: lower row first), kept over a
    stream of record batches. NaN scores rank last."""

    def __init__(self, k: int, column: str) -> None:
        self.k, self.column = k, column
        self.table: pa.Table | None = None

    @staticmethod
    def _order(table: pa.Table, column: str) -> np.ndarray:
        score = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        score = np.where(np.isnan(score), -np.inf, score)
        rows = table.column("row").to_numpy()
        return np.lexsort((rows, -score))  # last key is primary: score descending, then row

    def update(self, batch: pa.RecordBatch) -> None:
        if self.k <= 0:
            return
        table = pa.Table.from_batches([batch]).filter(pc.equal(batch.column("valid"), True))
        if table.num_rows == 0:
            return
        table = table.take(self._order(table, self.column)[: self.k])
        if self.table is not None:
            table = pa.concat_tables([self.table, table])
            table = table.take(self._order(table, self.column)[: self.k])
        self.table = table

    def rows(self) -> list[dict[str, Any]]:
        if self.table is None:
            return []
        out = []
        for rec in self.table.drop_columns(["valid", "error"]).to_pylist():
            out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()})
        return out


# -- merge ---------------------------------------------------------------------------------


class MergeError(RuntimeError):
    pass


def _row_groups(path: Path, schema: pa.Schema) -> Iterator[pa.Table]:
    with open_read(path) as fh:
        pf = pq.ParquetFile(fh)
        if pf.schema_arrow != schema:
            raise MergeError(f"part {path.name} has another schema")
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg)


def merge(
    parts: Iterable[tuple[Path, int, int]], schema: pa.Schema, parquet_path: Path, csv_path: Path | None, topk: TopK
) -> dict[str, int]:
    """Concatenate part files [(path, start_row, stop_row)] in order. Every part must hold
    exactly rows start_row..stop_row-1 in order; returns counts."""
    counts = {"rows": 0, "valid": 0}
    sinks = [open_write(parquet_path)] + ([open_write(csv_path)] if csv_path else [])
    pw = pq.ParquetWriter(sinks[0], schema)
    cw = pacsv.CSVWriter(sinks[1], schema) if csv_path else None
    try:
        for path, start, stop in parts:
            expected = start
            for table in _row_groups(path, schema):
                rows = table.column("row").to_numpy()
                if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
                    raise MergeError(f"part {path.name}: rows out of order near row {expected}")
                expected += len(rows)
                pw.write_table(table)
                if cw is not None:  # CSV only: text that would run as a spreadsheet formula is escaped
                    cw.write_table(csv_safe(table))
                counts["rows"] += table.num_rows
                counts["valid"] += int(pc.sum(table.column("valid")).as_py() or 0)
                for batch in table.to_batches():
                    topk.update(batch)
            if expected != stop:
                raise MergeError(f"part {path.name} holds rows {start}..{expected - 1}, expected up to {stop - 1}")
        pw.close()
        pw = None
        if cw is not None:
            cw.close()
            cw = None
    except BaseException:
        for w in (pw, cw):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.close()
        for sink in sinks:
            sink.discard()
        raise
    for sink in sinks:
        sink.close()
    return counts
