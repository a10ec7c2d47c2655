"""The score table: part files, the ordered merge, top-K, CSV streaming."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from app.kinds.score import csv_from_parquet
from workers.scoring import table as tbl


def test_output_columns_never_clash_with_fixed_ones() -> None:
    assert tbl.score_columns(["solubility"]) == ["solubility"]
    assert tbl.score_columns(["row", "valid", "p_1", "score_row"]) == ["score_row", "score_valid", "p_1",
                                                                       "score_score_row"]


def part(tmp_path, start: int, n: int, scores, cols=("y",), name=None):  # noqa: ANN001, ANN201
    schema = tbl.table_schema(cols)
    rows = list(range(start, start + n))
    errors = [None if np.isfinite(s) else "SMILES parse error: x" for s in scores]
    batch = tbl.build_batch(schema, cols, rows, [f"id{r}" for r in rows], [f"C{r}" for r in rows],
                            [f"C{r}" if e is None else None for r, e in zip(rows, errors)],
                            np.asarray(scores, dtype=np.float32).reshape(n, len(cols)), errors)
    w = tbl.PartWriter(tmp_path / (name or f"part-{start}.parquet"), schema)
    w.write(batch)
    return w.close(), schema


def test_merge_keeps_input_order_nulls_invalid_scores_and_ranks(tmp_path) -> None:  # noqa: ANN001
    p0, schema = part(tmp_path, 0, 4, [0.5, np.nan, 2.0, 2.0])
    p1, _ = part(tmp_path, 4, 3, [2.0, -1.0, 9.0])
    top = tbl.TopK(4, "y")
    counts = tbl.merge([(p0, 0, 4), (p1, 4, 7)], schema, tmp_path / "s.parquet", tmp_path / "s.csv", top)
    assert counts == {"rows": 7, "valid": 6}
    t = pq.read_table(tmp_path / "s.parquet")
    assert t.column("row").to_pylist() == list(range(7))
    assert t.column("y").to_pylist()[1] is None and t.column("valid").to_pylist()[1] is False
    csv = pd.read_csv(tmp_path / "s.csv")
    assert list(csv.columns) == ["row", "id", "smiles", "canonical_smiles", "y", "valid", "error"]
    assert csv["row"].tolist() == list(range(7)) and np.isnan(csv["y"][1]) and csv["error"][1].startswith("SMILES")
    # highest first; equal scores by input row
    assert [(r["row"], r["y"]) for r in top.rows()] == [(6, 9.0), (2, 2.0), (3, 2.0), (4, 2.0)]
    assert set(top.rows()[0]) == {"row", "id", "smiles", "canonical_smiles", "y"}
    streamed = b"".join(csv_from_parquet(tmp_path / "s.parquet", chunk_rows=3))
    assert pd.read_csv(io.BytesIO(streamed)).equals(csv)


def test_merge_refuses_a_gap_or_a_short_part_and_leaves_no_file(tmp_path) -> None:  # noqa: ANN001
    p0, schema = part(tmp_path, 0, 3, [1, 2, 3])
    p2, _ = part(tmp_path, 4, 2, [1, 2])
    with pytest.raises(tbl.MergeError):
        tbl.merge([(p0, 0, 3), (p2, 3, 5)], schema, tmp_path / "s.parquet", None, tbl.TopK(1, "y"))
    with pytest.raises(tbl.MergeError):
        tbl.merge([(p0, 0, 4)], schema, tmp_path / "s.parquet", None, tbl.TopK(1, "y"))
    assert not list(tmp_path.glob("*s.parquet*"))


def test_empty_merge_writes_headers_and_zero_top_k(tmp_path) -> None:  # noqa: ANN001
    schema = tbl.table_schema(["y"])
    top = tbl.TopK(0, "y")
    counts = tbl.merge([], schema, tmp_path / "s.parquet", tmp_path / "s.csv", top)
    assert counts == {"rows": 0, "valid": 0} and top.rows() == []
    assert (tmp_path / "s.csv").read_text().startswith('"row","id","smiles"')
    assert b"".join(csv_from_parquet(tmp_path / "s.parquet")).startswith(b'"row","id"')
