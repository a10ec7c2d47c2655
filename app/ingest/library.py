"""Drug libraries to score: .smi, CSV or TSV, gzip allowed, up to tens of millions of rows.

Upload only checks the structure and counts rows in one constant-memory pass; molecules
are validated when scored. A "row" is a non-blank, non-comment line of a .smi file or a
non-blank data record of a CSV/TSV; rows are numbered from 0 in file order, and the
numbering is the same for ``ingest_library``, ``iter_library_rows`` and
``library_row_offsets``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping
from typing import Any

from app.artifacts import plaintext_size
from app.chem import parse_smiles, quiet_rdkit

from .common import IngestLimits, IngestReport, check_option_names, opt_str, resolve_column
from .errors import IngestError
from .textio import (
    base_name,
    delimiter_name,
    detect_delimiter,
    first_line,
    iter_lines,
    iter_records,
    open_binary,
    open_checked,
    open_text,
)

OPTIONS = ("text_column", "id_column", "format", "delimiter")
FORMATS = ("smi", "csv", "tsv")
_SMI_EXT = {".smi", ".smiles", ".ism", ".can"}
_SMI_HEADER = {"smiles", "smile", "canonical_smiles", "isomeric_smiles"}
_ID_NAMES = ("id", "name", "compound_id", "mol_id", "molecule_id", "cid", "chembl_id", "zinc_id", "title")
SMILES_SAMPLE = 1000  # rows parsed with RDKit at upload; the rest are validated when scored


def ingest_library(
    path: str,
    original_filename: str,
    options: Mapping[str, Any] | None = None,
    limits: IngestLimits | Mapping[str, Any] | None = None,
) -> IngestReport:
    limits = IngestLimits.of(limits)
    options = dict(options or {})
    check_option_names(options, OPTIONS, "library")
    text_column = opt_str(options, "text_column", None)
    explicit_text = text_column is not None
    text_column = text_column or "smiles"
    id_column = opt_str(options, "id_column", None)
    compressed = open_checked(path, original_filename)
    head = first_line(path, compressed, limits)
    given_format = opt_str(options, "format", None, FORMATS)
    fmt = given_format or _detect_format(head, original_filename, text_column)

    if fmt == "smi":
        schema = _smi_schema(path, compressed, limits)
    else:
        schema = _csv_schema(
            path,
            compressed,
            limits,
            fmt,
            head,
            original_filename,
            text_column,
            explicit_text,
            id_column,
            opt_str(options, "delimiter", None),
        )
    rows = empty = 0
    sample: list[tuple[int, str]] = []  # (row, text) of the first non-empty rows
    for _, text in _iter_rows(path, schema, limits, schema["data_offset"]):
        if not text:
            empty += 1
        elif len(sample) < SMILES_SAMPLE:
            sample.append((rows, text))
        rows += 1
    if rows == 0:
        raise IngestError("no_rows", "the library has no rows" + (" after its header" if schema["header"] else ""))
    warn: list[str] = []
    checked = _check_smiles(sample, rows, empty, original_filename, schema, warn)
    if empty:
        warn.append(f"{empty} of {rows} rows have no SMILES; they will be reported as invalid when scored")
    return IngestReport(
        rows=rows,
        invalid_rows=0,
        invalid_samples=[],
        schema=schema,
        stats={
            "bytes": plaintext_size(path),
            "empty_text_rows": empty,
            "smiles_checked": checked,
            "inferred": _inferred(schema, given_format is not None, explicit_text),
        },
        data_path=None,
        warnings=warn,
    )


# A library none of whose first rows parses is refused once this many were checked (fewer
# prove little: such a small file is accepted with a loud warning, its rows reported invalid).
MIN_ROWS_TO_REFUSE = 10


def _check_smiles(
    sample: list[tuple[int, str]], rows: int, empty: int, filename: str, schema: Mapping[str, Any], warn: list[str]
) -> dict[str, Any]:
    """Parse the first rows with RDKit: refuse a library none of whose sampled rows is a
    molecule (the wrong column, or not a SMILES file at all), warn about a bad share."""
    name = os.path.basename(filename or "") or "the library"
    where = f"column {schema['text_column']!r}" if schema["text_column"] else "the first field of each line"
    if not sample:
        raise IngestError(
            "no_valid_rows",
            f"{name}: all {rows} rows have an empty {where}; there is nothing to score",
            {"rows": rows, "empty_text_rows": empty},
        )
    bad: list[dict[str, Any]] = []
    with quiet_rdkit():
        for row, text in sample:
            mol, reason = parse_smiles(text)
            if mol is None:
                bad.append({"row": row, "text": text[:100], "reason": reason})
    scope = f"the {len(sample)} non-empty rows" if len(sample) + empty >= rows else f"the first {len(sample)} rows"
    if len(bad) == len(sample) and len(sample) >= MIN_ROWS_TO_REFUSE:
        first = bad[0]
        raise IngestError(
            "no_valid_rows",
            f"{name}: none of {scope} holds a valid SMILES in {where} (row {first['row']}: {first['text']!r}: "
            f"{first['reason']}); is this a SMILES library, and is text_column right?",
            {"checked": len(sample), "invalid_samples": bad[:20], "header": schema["header"]},
        )
    if len(bad) == len(sample):  # too few rows to be sure it is the wrong file: say so loudly
        warn.insert(
            0,
            f"none of {scope} holds a valid SMILES in {where} (row {bad[0]['row']}: {bad[0]['text']!r}); "
            "every row will be reported as invalid when scored: is this a SMILES library, and is text_column right?",
        )
    elif bad:
        warn.append(
            f"{len(bad)} of {scope} are not valid SMILES (row {bad[0]['row']}: {bad[0]['text']!r}); "
            "such rows are reported as invalid when scored"
        )
    return {"rows": len(sample), "invalid": len(bad), "invalid_samples": bad[:5]}


def _inferred(schema: Mapping[str, Any], given_format: bool, explicit_text: bool) -> dict[str, Any]:
    """What was read from the file rather than given as options, for the upload response."""
    fmt = schema["format"]
    out: dict[str, Any] = {
        "format": fmt,
        "format_source": "option" if given_format else "detected",
        "compressed": schema["compressed"],
        "text_column": schema["text_column"],
        "id_column": schema["id_column"],
    }
    if fmt == "smi":
        text = "format smi (SMILES then an optional id per line)" + (", title line skipped" if schema["header"] else "")
    else:
        out["delimiter"] = schema["delimiter"]
        ident = f"id column {schema['id_column']!r}" if schema["id_column"] else "no id column"
        text = (
            f"format {fmt} ({delimiter_name(schema['delimiter'])}-delimited); "
            f"SMILES column {schema['text_column']!r}{'' if explicit_text else ' (default)'}; {ident}"
        )
    out["summary"] = text + ("; gzip-compressed" if schema["compressed"] else "")
    return out


def iter_library_rows(
    path: str,
    schema: Mapping[str, Any],
    start: int = 0,
    stop: int | None = None,
    offset: int | None = None,
    limits: IngestLimits | Mapping[str, Any] | None = None,
) -> Iterator[tuple[int, str | None, str]]:
    """Yield (row_number, id or None, text) for rows start <= row_number < stop, streaming.

    ``offset`` is the byte offset of row ``start`` from library_row_offsets(); with it the
    reader seeks instead of scanning from the top (for gzip a seek still decompresses up
    to that point). Text is stripped; undecodable bytes become U+FFFD, so such a SMILES
    fails to parse at scoring rather than here.
    """
    limits = IngestLimits.of(limits)
    if stop is not None and stop <= start:
        return
    row, pos = (0, schema["data_offset"]) if offset is None else (start, offset)
    for ident, text in _iter_rows(path, schema, limits, pos):
        if row >= start:
            if stop is not None and row >= stop:
                return
            yield row, ident, text
        row += 1


def library_row_offsets(
    path: str, schema: Mapping[str, Any], every_n: int, limits: IngestLimits | Mapping[str, Any] | None = None
) -> list[int]:
    """Byte offsets (in the uncompressed stream) of rows 0, every_n, 2*every_n, ... for sharding:
    shard k is ``iter_library_rows(path, schema, k*every_n, (k+1)*every_n, offset=offsets[k])``."""
    if every_n < 1:
        raise ValueError("every_n must be >= 1")
    limits = IngestLimits.of(limits)
    offsets = []
    row = 0
    with open_binary(path, schema["compressed"]) as fp:
        fp.seek(schema["data_offset"])
        if schema["format"] == "smi":
            starts = (pos for pos, raw in iter_lines(fp, limits, schema["data_offset"]) if _smi_row(raw))
        else:
            starts = (pos for pos, _, _ in iter_records(fp, schema["delimiter"], limits, offset=schema["data_offset"]))
        for pos in starts:
            if row % every_n == 0:
                offsets.append(pos)
            row += 1
    return offsets


# -- internals ----------------------------------------------------------------------


def _detect_format(head: str, filename: str, text_column: str) -> str:
    ext = os.path.splitext(base_name(filename))[1]
    if ext in _SMI_EXT:
        return "smi"
    if ext == ".csv":
        return "csv"
    if ext in (".tsv", ".tab"):
        return "tsv"
    # .txt or no extension: a delimited file has the text column in its header line
    for delim, fmt in (("\t", "tsv"), (",", "csv")):
        if delim in head and resolve_column([f.strip().strip('"') for f in head.split(delim)], text_column, False):
            return fmt
    return "smi"


def _smi_schema(path: str, compressed: bool, limits: IngestLimits) -> dict[str, Any]:
    header: list[str] = []
    data_offset = 0
    with open_binary(path, compressed) as fp:
        for offset, raw in iter_lines(fp, limits):
            line = raw.decode("utf-8", "replace").lstrip("\ufeff").strip()
            if not line or line.startswith("#"):
                continue
            # No header is expected, but a "SMILES Name" title line is common; don't count it as a row.
            if line.split()[0].lower() in _SMI_HEADER:
                header = line.split()
                data_offset = offset + len(raw)
            break
    return {
        "kind": "library",
        "format": "smi",
        "compressed": compressed,
        "delimiter": None,
        "text_column": None,
        "id_column": None,
        "header": header,
        "data_offset": data_offset,
        "text_index": 0,
        "id_index": 1,
    }


def _csv_schema(
    path: str,
    compressed: bool,
    limits: IngestLimits,
    fmt: str,
    head: str,
    filename: str,
    text_column: str,
    explicit_text: bool,
    id_column: str | None,
    delimiter: str | None,
) -> dict[str, Any]:
    delim = detect_delimiter(head, filename, delimiter or ("\t" if fmt == "tsv" else ","))
    with open_binary(path, compressed) as fp:
        records = iter_records(fp, delim, limits)
        first = next(records, None)
        # the data starts where the second record does (a quoted header may span lines)
        second = next(records, None)
    if first is None:
        raise IngestError("empty_file", "the file is empty")
    header = [f.strip() for f in first[2]]
    kind = "TSV" if delim == "\t" else "CSV"
    found = resolve_column(header, text_column, explicit_text)
    if found is None:
        raise IngestError(
            "missing_column",
            f"{kind} has no column {text_column!r}; columns are: "
            f"{', '.join(header)}. Set text_column to the column holding the SMILES.",
            {"columns": header},
        )
    text_column = found
    if id_column is not None and id_column not in header:
        raise IngestError(
            "missing_column",
            f"{kind} has no id column {id_column!r}; columns are: {', '.join(header)}",
            {"columns": header},
        )
    if id_column is None:
        lower = {h.lower(): h for h in header if h != text_column}
        id_column = next((lower[n] for n in _ID_NAMES if n in lower), None)
    if second is None:
        raise IngestError("no_rows", "the library has a header but no rows")
    return {
        "kind": "library",
        "format": fmt,
        "compressed": compressed,
        "delimiter": delim,
        "text_column": text_column,
        "id_column": id_column,
        "header": header,
        "data_offset": second[0],
        "text_index": header.index(text_column),
        "id_index": header.index(id_column) if id_column is not None else None,
    }


def _smi_row(raw: bytes) -> bool:
    line = raw.decode("utf-8", "replace").lstrip("\ufeff").strip()
    return bool(line) and line[0] != "#"


def _iter_rows(
    path: str, schema: Mapping[str, Any], limits: IngestLimits, offset: int
) -> Iterator[tuple[str | None, str]]:
    """(id, text) of each row from byte ``offset``, read at C speed (csv.reader over a text stream)."""
    if schema["format"] == "smi":
        with open_text(path, schema["compressed"], limits, offset, newline="\n") as f:
            for line in f:
                line = line.lstrip("\ufeff").strip()
                if line and line[0] != "#":
                    parts = line.split(None, 1)
                    yield (parts[1].strip() if len(parts) > 1 else None), parts[0]
        return
    ti, ii = schema["text_index"], schema["id_index"]
    with open_text(path, schema["compressed"], limits, offset) as f:
        reader = csv.reader(f, delimiter=schema["delimiter"])
        try:
            for fields in reader:
                if fields:  # else a blank line
                    text = fields[ti].strip() if ti < len(fields) else ""
                    ident = fields[ii].strip() if ii is not None and ii < len(fields) else None
                    yield ident or None, text
        except csv.Error as exc:
            raise IngestError("invalid_csv", f"CSV syntax error near line {reader.line_num}: {exc}") from None


class SchemaError(ValueError):
    pass


def library_schema(
    schema: Mapping[str, Any], text_column: str | None = None, id_column: str | None = None
) -> dict[str, Any]:
    """The dataset's stored schema with text/id columns overridden by the score spec."""
    out = dict(schema)
    if text_column is None and id_column is None:
        return out
    if out.get("format") == "smi":
        raise SchemaError(
            "text_column and id_column apply to CSV/TSV libraries; a .smi library holds "
            "the SMILES then an optional id on each line"
        )
    header = list(out.get("header") or [])
    for name, value in (("text_column", text_column), ("id_column", id_column)):
        if value is not None and value not in header:
            raise SchemaError(f"the library has no column {value!r} ({name}); its columns are: {', '.join(header)}")
    if text_column is not None:
        out["text_column"], out["text_index"] = text_column, header.index(text_column)
    if id_column is not None:
        out["id_column"], out["id_index"] = id_column, header.index(id_column)
    return out
