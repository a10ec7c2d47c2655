"""Sequence datasets: CSV/TSV (gzip allowed) with a text column (SMILES, or whitespace-
separated tokens such as clinical codes) and label columns.

One streaming pass validates the text of every row, writes valid rows to a temporary
parquet file (labels still as strings) and accumulates per-column statistics; a second
pass over that parquet casts label columns to their inferred types and writes
``work_dir/data.parquet`` with columns ``text``, ``source_row`` and the label columns.
``source_row`` is the 0-based index of the record among the file's non-blank data rows,
i.e. the row ``pandas.read_csv(file).iloc[source_row]`` returns.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from app import artifacts
from app.artifacts import open_read, open_write
from app.chem import canonical_smiles, quiet_rdkit

from .common import (
    IngestLimits,
    IngestReport,
    InvalidRows,
    check_option_names,
    opt_int,
    opt_list,
    opt_str,
    resolve_column,
)
from .errors import IngestError
from .textio import delimiter_name, detect_delimiter, first_line, iter_records, open_binary, open_checked

OPTIONS = ("text_column", "tokenizer", "label_columns", "max_length", "delimiter")
TOKENIZERS = ("smiles", "whitespace")
RESERVED = ("text", "source_row")
_CHUNK_ROWS = 20_000
_PROGRESS_ROWS = 20_000
Progress = Callable[[int, int], None]
_UNNAMED = "unnamed_"
_MISSING = {"", "na", "n/a", "nan", "null", "none", "#n/a"}
_INT_RE = r"[+-]?\d+"
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of non-UTF-8 bytes
_MAX_INT_CLASSES = 50  # integer labels with more distinct values are regression targets
_MAX_CLASSES = 10_000  # above this a string column is not a usable class label
_MAX_STRAY_SHARE = 0.05  # a column this close to numeric is numeric with its text values missing
_STRAY_SAMPLES = 3
# Columns that are not labels unless label_columns names them (inference only)
_SPLIT_VALUES = frozenset(
    {"train", "training", "trn", "valid", "val", "validation", "dev", "test", "testing", "tst", "holdout", "eval"}
)
_SPLIT_NAME = re.compile(r"(?i)^(?:.*[_\s.-])?(?:split|fold|folds|set|subset|partition)(?:[_\s.-]?\d+|[_\s.-]\w+)?$")
_SPLIT_WORD = re.compile(r"(?i)(?:^|[^a-z])(?:" + "|".join(sorted(_SPLIT_VALUES)) + r")(?:$|[^a-z])")
_ID_NAME = re.compile(
    r"(?i:^(?:id|ids|idx|index|name|names|title|compound|molecule|iupac|iupac_name|cas|cas_rn|cas_number)$)"
    r"|(?i:[_\s.-](?:id|ids|idx|cid|name|names)$)"
    r"|[a-z](?:Id|ID|Name)$"
)
_STRUCTURE_NAME = re.compile(r"(?i)(?:^|[_\s.-])(?:smiles|inchi|inchikey|inchi_key|selfies)$")


def ingest_sequences(
    path: str,
    original_filename: str,
    work_dir: str,
    options: Mapping[str, Any] | None = None,
    limits: IngestLimits | Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """``progress(rows, offset)``, if given, is called every few thousand rows with the rows
    read so far and the byte offset reached in the uncompressed text."""
    limits = IngestLimits.of(limits)
    options = dict(options or {})
    check_option_names(options, OPTIONS, "sequences")
    text_column = opt_str(options, "text_column", None)
    explicit_text = text_column is not None
    text_column = text_column or "smiles"
    tokenizer = opt_str(options, "tokenizer", "smiles", TOKENIZERS)
    wanted = opt_list(options, "label_columns")
    max_length = opt_int(options, "max_length", 1000, 1, 1_000_000)
    os.makedirs(work_dir, exist_ok=True)

    compressed = open_checked(path, original_filename)
    given_delimiter = opt_str(options, "delimiter", None)
    delimiter = detect_delimiter(first_line(path, compressed, limits), original_filename, given_delimiter)
    invalid = InvalidRows(limits.max_invalid_samples)
    warn: list[str] = []
    raw_path = os.path.join(work_dir, "_rows.parquet")
    out_path = os.path.join(work_dir, "data.parquet")
    try:
        with open_binary(path, compressed) as fp:
            records = iter_records(fp, delimiter, limits, errors="surrogateescape")
            header, text_column = _header(next(records, None), text_column, explicit_text, delimiter)
            labels, ignored = _label_columns(header, text_column, wanted)
            col_stats = {c: _ColumnStats() for c in labels}
            rows, text_len = _first_pass(
                records, header, text_column, tokenizer, max_length, labels, col_stats, invalid, raw_path, progress
            )
        if rows == 0:
            raise IngestError(
                "no_valid_rows",
                f"no valid rows: all {invalid.count} rows were invalid"
                if invalid.count
                else "the file has a header but no rows",
                {
                    "invalid_rows": invalid.count,
                    "invalid_samples": invalid.samples,
                    "invalid_reasons": dict(invalid.reasons),
                },
            )
        types: dict[str, str] = {}
        for c, st in col_stats.items():
            kind, reason = st.infer(c, explicit=wanted is not None, warn=warn)
            if kind is not None:
                types[c] = kind
            else:
                ignored[c] = reason or "not usable"
        kept = list(types)
        _second_pass(raw_path, out_path, kept, types, col_stats)
    finally:
        for leftover in (raw_path, out_path + ".tmp"):
            artifacts.remove(leftover)

    classes = {c: col_stats[c].classes() for c in kept if types[c] != "float"}
    label_types = {c: "float" if types[c] == "float" else "category" for c in kept}
    inferred = _inferred(
        text_column=text_column,
        text_source="option" if explicit_text else "default",
        tokenizer=tokenizer,
        tokenizer_source="option" if options.get("tokenizer") else "default",
        delimiter=delimiter,
        delimiter_source="option" if given_delimiter else "detected",
        compressed=compressed,
        label_types=label_types,
        classes=classes,
        labels_source="option" if wanted is not None else "inferred",
        ignored=ignored,
    )
    if wanted is None and (ignored or not kept):
        warn.insert(0, inferred["labels"] + "; pass label_columns=... to choose")
    return IngestReport(
        rows=rows,
        invalid_rows=invalid.count,
        invalid_samples=invalid.samples,
        schema={
            "kind": "sequences",
            "text_column": text_column,
            "tokenizer": tokenizer,
            "label_columns": kept,
            "label_types": label_types,
            "classes": classes,
            "delimiter": delimiter,
            "compressed": compressed,
            "header": header,
        },
        stats={
            "labels": {c: col_stats[c].summary(types[c]) for c in kept},
            "text_length": text_len,
            "invalid_reasons": dict(invalid.reasons),
            "inferred": inferred,
        },
        data_path=out_path,
        warnings=warn,
    )


def _header(
    first: tuple[int, int, list[str]] | None, text_column: str, explicit: bool, delimiter: str
) -> tuple[list[str], str]:
    if first is None:
        raise IngestError("empty_file", "the file is empty")
    _, _, header = first
    header = [h.strip() for h in header]
    if any(_UNDECODABLE.search(h) for h in header):
        raise IngestError("invalid_encoding", "the header row is not valid UTF-8 text")
    # an unnamed column is usually a pandas index written by DataFrame.to_csv()
    header = [h or f"{_UNNAMED}{i}" for i, h in enumerate(header)]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise IngestError("invalid_header", f"the header names column(s) twice: {', '.join(dupes)}")
    found = resolve_column(header, text_column, explicit)
    if found is None:
        sep = {"\t": "tab", ",": "comma"}.get(delimiter, repr(delimiter))
        raise IngestError(
            "missing_column",
            f"{'TSV' if delimiter == chr(9) else 'CSV'} has no column "
            f"{text_column!r}; columns are: {', '.join(header)} (read with {sep} as the "
            "delimiter). Set text_column to the column holding the sequences.",
            {"columns": header, "text_column": text_column},
        )
    return header, found


def _label_columns(header: list[str], text_column: str, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The candidate label columns, and the columns ruled out by their header alone (with why)."""
    ignored: dict[str, str] = {}
    if wanted is None:
        labels = []
        for h in header:
            if h == text_column:
                continue
            reason = _ignored_by_name(h)
            if reason:
                ignored[h] = reason
            else:
                labels.append(h)
    else:
        missing = [c for c in wanted if c not in header]
        if missing:
            raise IngestError(
                "missing_column",
                f"label column(s) {', '.join(map(repr, missing))} not in the file; columns are: {', '.join(header)}",
                {"columns": header, "missing": missing},
            )
        if text_column in wanted:
            raise IngestError("invalid_option", f"{text_column!r} is the text column; it cannot also be a label")
        labels = wanted
    clash = [c for c in labels if c in RESERVED]
    if clash:
        raise IngestError(
            "invalid_header",
            f"column name(s) {', '.join(clash)} are reserved for the output "
            "(text, source_row); rename them or leave them out of label_columns",
        )
    return labels, ignored


def _ignored_by_name(name: str) -> str | None:
    """Why a column is not a label whatever its values (when label_columns is not given)."""
    if name.startswith(_UNNAMED):
        return "unnamed column, e.g. a saved index"
    if _ID_NAME.search(name):
        return "identifier"
    if _STRUCTURE_NAME.search(name):
        return "another structure column"
    return None


def _inferred(
    *,
    text_column: str,
    text_source: str,
    tokenizer: str,
    tokenizer_source: str,
    delimiter: str,
    delimiter_source: str,
    compressed: bool,
    label_types: dict[str, str],
    classes: dict[str, list[int | str]],
    labels_source: str,
    ignored: dict[str, str],
) -> dict[str, Any]:
    """What was read from the file rather than given as options, for the upload response
    (lists, not objects, so that the order survives a JSONB column)."""

    def show(c: str) -> str:
        if label_types[c] == "float":
            return f"{c} (float)"
        n = len(classes.get(c, []))
        return f"{c} (category, {n} class{'' if n == 1 else 'es'})"

    verb = "given" if labels_source == "option" else "inferred"
    labels = f"label columns {verb}: {', '.join(map(show, label_types)) or 'none'}"
    if ignored:
        labels += "; ignored: " + ", ".join(f"{c} ({why})" for c, why in ignored.items())
    delim = delimiter_name(delimiter)
    summary = (
        f"text column {text_column!r} ({text_source}); {delim}-delimited ({delimiter_source})"
        f"{', gzip-compressed' if compressed else ''}; tokenizer {tokenizer} ({tokenizer_source}); {labels}"
    )
    return {
        "text_column": text_column,
        "text_column_source": text_source,
        "delimiter": delimiter,
        "delimiter_name": delim,
        "delimiter_source": delimiter_source,
        "compressed": compressed,
        "tokenizer": tokenizer,
        "tokenizer_source": tokenizer_source,
        "label_columns": [{"name": c, "type": t} for c, t in label_types.items()],
        "label_columns_source": labels_source,
        "ignored_columns": [{"name": c, "reason": why} for c, why in ignored.items()],
        "labels": labels,
        "summary": summary,
    }


def _first_pass(
    records: Iterator[tuple[int, int, list[str]]],
    header: list[str],
    text_column: str,
    tokenizer: str,
    max_length: int,
    labels: list[str],
    col_stats: dict[str, _ColumnStats],
    invalid: InvalidRows,
    raw_path: str,
    progress: Progress | None = None,
) -> tuple[int, dict[str, float]]:
    ncols = len(header)
    ti = header.index(text_column)
    li = [header.index(c) for c in labels]
    schema = pa.schema(
        [("text", pa.string()), ("source_row", pa.int64())] + [(f"l{i}", pa.string()) for i in range(len(labels))]
    )
    rows = 0
    lengths: list[float] = [0, 0, math.inf, 0]  # count, sum, min, max
    buf_text: list[str] = []
    buf_row: list[int] = []
    buf_labels: list[list[str | None]] = [[] for _ in labels]

    def flush() -> None:
        if not buf_text:
            return
        cols = [pa.array(buf_text, pa.string()), pa.array(buf_row, pa.int64())]
        for j, values in enumerate(buf_labels):
            col_stats[labels[j]].update(values, buf_row)
            cols.append(pa.array(values, pa.string()))
            values.clear()
        writer.write_table(pa.Table.from_arrays(cols, schema=schema))
        buf_text.clear()
        buf_row.clear()

    with open_write(raw_path) as sink, pq.ParquetWriter(sink, schema) as writer, quiet_rdkit():
        for source_row, (offset, line, fields) in enumerate(records):
            if progress is not None and source_row % _PROGRESS_ROWS == 0:
                progress(source_row, offset)
            where = {"row": source_row, "line": line}
            if len(fields) > ncols:
                invalid.add(f"wrong number of fields: {len(fields)}, the header has {ncols}", **where)
                continue
            joined = "".join(fields)
            if not joined.isascii() and _UNDECODABLE.search(joined):
                invalid.add("row is not valid UTF-8 text", **where)
                continue
            raw = fields[ti].strip() if ti < len(fields) else ""
            if not raw:
                invalid.add("empty text", **where)
                continue
            if len(raw) > max_length:
                invalid.add(f"text too long: {len(raw)} characters; max_length is {max_length}", **where)
                continue
            if tokenizer == "smiles":
                if any(ch.isspace() for ch in raw):
                    invalid.add("SMILES parse error: SMILES contains whitespace", **where)
                    continue
                canon, reason = canonical_smiles(raw)
                if canon is None:
                    invalid.add(reason or "SMILES parse error", **where)
                    continue
                text = canon
            else:
                text = " ".join(raw.split())
            buf_text.append(text)
            buf_row.append(source_row)
            for j, i in enumerate(li):
                value = fields[i].strip() if i < len(fields) else ""
                buf_labels[j].append(None if value.lower() in _MISSING else value)
            n = len(text)
            lengths[0] += 1
            lengths[1] += n
            lengths[2] = min(lengths[2], n)
            lengths[3] = max(lengths[3], n)
            rows += 1
            if len(buf_text) >= _CHUNK_ROWS:
                flush()
        flush()
    text_len = {"min": lengths[2], "max": lengths[3], "mean": lengths[1] / lengths[0]} if lengths[0] else {}
    return rows, text_len


class _ColumnStats:
    """Running statistics of one label column, valid under both numeric and categorical readings
    until the whole file has been seen. Values that do not parse as numbers ("strays") are
    counted apart, so that a numeric column with a few stray strings stays numeric."""

    def __init__(self) -> None:
        self.count = self.missing = 0
        self.integer = True  # every numeric value so far is written as an integer
        self.non_numeric = 0  # values that are not numbers
        self.stray_samples: list[tuple[int, str]] = []  # (source row, value) of the first few
        self.non_finite = 0
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf
        self.counts: Counter[str] | None = Counter()
        self.kind: str | None = None  # set by infer()

    @property
    def numbers(self) -> int:
        return self.count - self.non_numeric

    def update(self, values: list[str | None], rows: list[int]) -> None:
        present = [i for i, v in enumerate(values) if v is not None]
        s = pd.Series([values[i] for i in present], dtype=object)
        self.missing += len(values) - len(s)
        self.count += len(s)
        if s.empty:
            return
        if self.counts is not None:
            self.counts.update(s.value_counts().to_dict())
            if len(self.counts) > _MAX_CLASSES:
                self.counts = None
        x = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
        stray = np.isnan(x)
        if stray.any():
            where = np.flatnonzero(stray)
            self.non_numeric += len(where)
            for k in where[: max(0, _STRAY_SAMPLES - len(self.stray_samples))]:
                self.stray_samples.append((rows[present[k]], str(s.iloc[k])))
            s, x = s[~stray], x[~stray]
            if s.empty:
                return
        self.integer = self.integer and bool(s.str.fullmatch(_INT_RE).all())
        finite = x[np.isfinite(x)]
        self.non_finite += len(x) - len(finite)
        if len(finite):
            # Chan et al. parallel update of mean and sum of squared deviations
            n, mean = len(finite), float(finite.mean())
            m2 = float(((finite - mean) ** 2).sum())
            delta, total = mean - self.mean, self.n + n
            self.mean += delta * n / total
            self.m2 += m2 + delta * delta * self.n * n / total
            self.n = total
            self.min, self.max = min(self.min, float(finite.min())), max(self.max, float(finite.max()))

    def _strays(self) -> str:
        shown = ", ".join(f"row {row}: {value[:40]!r}" for row, value in self.stray_samples)
        return shown + (", ..." if self.non_numeric > len(self.stray_samples) else "")

    def _mostly_numeric(self) -> bool:
        """Nearly all values are numbers: at most 5% (or a single one) are not."""
        return self.non_numeric <= max(1, int(self.count * _MAX_STRAY_SHARE)) and self.numbers >= 2

    def _distinct(self, numeric: bool) -> int:
        if self.counts is None:
            return _MAX_CLASSES + 1
        if numeric and self.non_numeric:
            return sum(1 for k in self.counts if re.fullmatch(_INT_RE, k))
        return len(self.counts)

    def _split_like(self, name: str) -> bool:
        """A train/valid/test assignment: split words as values, or a split-like name whose
        values are split words or a few fold numbers."""
        if self.counts is None or not self.counts or len(self.counts) > 20:
            return False
        values = [k.strip().lower() for k in self.counts]
        if all(v in _SPLIT_VALUES for v in values):
            return True
        if not _SPLIT_NAME.match(name):
            return False
        return all(_SPLIT_WORD.search(v) for v in values) or all(re.fullmatch(_INT_RE, v) for v in values)

    def infer(self, name: str, explicit: bool, warn: list[str]) -> tuple[str | None, str | None]:
        """('float' | 'int' | 'str', None) -- the last two are categorical -- or (None, why)
        to leave the column out."""
        kind, why = self._infer(name, explicit, warn)
        self.kind = kind
        return kind, why

    def _infer(self, name: str, explicit: bool, warn: list[str]) -> tuple[str | None, str | None]:
        if self.count == 0:
            if explicit:
                raise IngestError("empty_label", f"label column {name!r} has no values in the valid rows")
            return None, "empty"
        if not explicit and self._split_like(name):
            return None, "split assignment"
        numeric = self.numbers > 0 and (self.non_numeric == 0 or self._mostly_numeric())
        if numeric and self.non_numeric:
            s = "" if self.non_numeric == 1 else "s"
            warn.append(
                f"column {name!r}: {self.non_numeric} non-numeric value{s} treated as missing ({self._strays()})"
            )
        elif self.numbers and self.non_numeric:
            share = self.non_numeric / self.count
            warn.append(
                f"column {name!r} mixes numbers and text ({self.numbers} numeric, {self.non_numeric} text "
                f"values, e.g. {self._strays()}); treated as categorical because {share:.0%} of its values are "
                f"not numbers (a numeric column may have at most {_MAX_STRAY_SHARE:.0%} non-numeric values, "
                "which are then treated as missing)"
            )
        distinct = self._distinct(numeric)
        if numeric and self.integer and distinct <= _MAX_INT_CLASSES:
            return "int", None
        if numeric:
            if self.integer:
                warn.append(
                    f"integer column {name!r} has {distinct} distinct values; treated as a regression target (float)"
                )
            if self.non_finite:
                warn.append(f"column {name!r} has {self.non_finite} infinite values; stored as missing")
            return "float", None
        if distinct > _MAX_CLASSES:
            if explicit:
                raise IngestError(
                    "too_many_classes",
                    f"label column {name!r} has more than {_MAX_CLASSES} "
                    "distinct text values; it cannot be a class label",
                )
            return None, f"identifier: more than {_MAX_CLASSES} distinct values"
        if not explicit and ((distinct > 20 and distinct > self.count // 2) or (distinct == self.count >= 5)):
            return None, f"identifier: {distinct} distinct values in {self.count} rows"
        return "str", None

    def class_counts(self) -> dict[int, int] | dict[str, int]:
        """Counts per class in class order; integer labels are merged by value ("01" is 1)
        and stray text values (treated as missing) are left out."""
        if self.counts is None:  # only label columns with few enough classes get here
            raise RuntimeError("class counts were dropped for a column with too many classes")
        if self.kind == "int":
            merged: Counter[int] = Counter()
            for k, v in self.counts.items():
                if re.fullmatch(_INT_RE, k):
                    merged[int(k)] += v
            return dict(sorted(merged.items()))
        return dict(sorted(self.counts.items()))

    def classes(self) -> list[int | str]:
        return list(self.class_counts())

    def summary(self, kind: str) -> dict[str, Any]:
        out: dict[str, Any]
        if kind == "float":
            out = {
                "type": "float",
                "count": self.n,
                "missing": self.missing + self.non_finite + self.non_numeric,
                "mean": self.mean if self.n else None,
                "std": math.sqrt(self.m2 / self.n) if self.n else None,
                "min": self.min if self.n else None,
                "max": self.max if self.n else None,
            }
            if self.non_numeric:  # included in missing
                out["non_numeric"] = self.non_numeric
            return out
        out = {
            "type": "category",
            "count": self.count - (self.non_numeric if kind == "int" else 0),
            "missing": self.missing + (self.non_numeric if kind == "int" else 0),
            "class_counts": {str(k): v for k, v in self.class_counts().items()},
        }
        if kind == "int" and self.non_numeric:
            out["non_numeric"] = self.non_numeric
        return out


def _second_pass(
    raw_path: str, out_path: str, labels: list[str], types: dict[str, str], stats: dict[str, _ColumnStats]
) -> None:
    with open_read(raw_path) as raw:
        _cast_labels(pq.ParquetFile(raw), out_path, labels, types, stats)


def _cast_labels(
    src: pq.ParquetFile, out_path: str, labels: list[str], types: dict[str, str], stats: dict[str, _ColumnStats]
) -> None:
    names = src.schema_arrow.names  # text, source_row, l0, l1, ... in the order of col_stats
    index = {c: names[2 + i] for i, c in enumerate(stats)}
    arrow_type = {"float": pa.float64(), "int": pa.int64(), "str": pa.string()}
    schema = pa.schema(
        [("text", pa.string()), ("source_row", pa.int64())] + [(c, arrow_type[types[c]]) for c in labels]
    )
    with open_write(out_path) as sink, pq.ParquetWriter(sink, schema) as writer:
        for batch in src.iter_batches(batch_size=_CHUNK_ROWS * 5):
            cols = [batch.column("text"), batch.column("source_row")]
            for c in labels:
                col = batch.column(index[c])
                if types[c] != "str":
                    x = pd.to_numeric(col.to_pandas(), errors="coerce").to_numpy(np.float64, copy=True)
                    x[~np.isfinite(x)] = np.nan
                    col = pa.array(x, pa.float64(), from_pandas=True)  # NaN -> null
                    if types[c] == "int":
                        col = col.cast(pa.int64())
                cols.append(col)
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
