"""Drug libraries to score: streamed row counts, row iteration and shard offsets."""
from __future__ import annotations

import gzip

import pytest

from app.ingest import IngestError, IngestLimits, ingest, iter_library_rows, library_row_offsets

SMI = (b"# a library\n"
       b"CCO ethanol\n"
       b"\n"
       b"   \n"
       b"c1ccccc1\tbenzene ring\r\n"
       b"# comment in the middle\n"
       b"C((C broken\n"
       b"CN\n"
       b"\n")


def library(tmp_path, name, content, **options):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p), ingest("library", str(p), name, None, options)


def test_smi_counts_rows_not_blank_or_comment_lines(tmp_path):
    path, r = library(tmp_path, "lib.smi", SMI)
    assert r.rows == 4 and r.invalid_rows == 0 and r.data_path is None
    assert r.schema["format"] == "smi" and r.schema["compressed"] is False
    assert r.stats["bytes"] == len(SMI)
    assert list(iter_library_rows(path, r.schema)) == [
        (0, "ethanol", "CCO"), (1, "benzene ring", "c1ccccc1"), (2, "broken", "C((C"), (3, None, "CN")]


def test_smi_title_line_is_not_a_row(tmp_path):
    path, r = library(tmp_path, "lib.smi", b"SMILES Name\nCCO a\nCCN b\n")
    assert r.rows == 2 and r.schema["header"] == ["SMILES", "Name"]
    assert [t for _, _, t in iter_library_rows(path, r.schema)] == ["CCO", "CCN"]


def test_gzip_library_row_count(tmp_path):
    rows = [f"C{'C' * (i % 7)}O mol{i}" for i in range(2500)]
    content = gzip.compress(("\n".join(rows) + "\n\n").encode())
    path, r = library(tmp_path, "lib.smi.gz", content)
    assert r.rows == 2500 and r.schema["compressed"] is True
    got = list(iter_library_rows(path, r.schema, start=2498))
    assert got == [(2498, "mol2498", "CCCCCCCO"), (2499, "mol2499", "CO")]


def test_iter_order_start_stop_and_offsets(tmp_path):
    lines = b"".join(b"C" * (1 + i % 5) + b" id%d\n" % i + (b"\n# c\n" if i % 3 == 0 else b"") for i in range(100))
    path, r = library(tmp_path, "lib.smi", lines)
    assert r.rows == 100
    everything = list(iter_library_rows(path, r.schema))
    assert [row for row, _, _ in everything] == list(range(100))
    assert [i for _, i, _ in everything] == [f"id{n}" for n in range(100)]
    assert list(iter_library_rows(path, r.schema, 10, 13)) == everything[10:13]
    offsets = library_row_offsets(path, r.schema, 30)
    assert len(offsets) == 4
    shards = [list(iter_library_rows(path, r.schema, k * 30, (k + 1) * 30, offset=o)) for k, o in enumerate(offsets)]
    assert sum(shards, []) == everything


def test_csv_library_with_ids_quotes_and_shards(tmp_path):
    content = (b"Name,smiles,mw\n"
               b"\"aspirin, acetyl\",CC(=O)Oc1ccccc1C(=O)O,180\n"
               b"\n"
               b"caffeine,Cn1cnc2c1c(=O)n(C)c(=O)n2C,194\n"
               b"empty,,0\n"
               b"ethanol,CCO,46\n")
    path, r = library(tmp_path, "lib.csv", content)
    assert r.rows == 4 and r.stats["empty_text_rows"] == 1
    assert r.schema["id_column"] == "Name" and r.schema["header"] == ["Name", "smiles", "mw"]
    rows = list(iter_library_rows(path, r.schema))
    assert rows[0] == (0, "aspirin, acetyl", "CC(=O)Oc1ccccc1C(=O)O") and rows[2] == (2, "empty", "")
    offsets = library_row_offsets(path, r.schema, 2)
    assert [list(iter_library_rows(path, r.schema, 2 * k, 2 * k + 2, offset=o)) for k, o in enumerate(offsets)] \
        == [rows[:2], rows[2:]]


def test_tsv_gzip_with_explicit_columns(tmp_path):
    content = gzip.compress(b"cid\tstructure\n1\tCCO\n2\tCCN\n")
    path, r = library(tmp_path, "lib.tsv.gz", content, text_column="structure", id_column="cid")
    assert r.schema["format"] == "tsv" and r.schema["compressed"] and r.rows == 2
    assert list(iter_library_rows(path, r.schema)) == [(0, "1", "CCO"), (1, "2", "CCN")]


def test_txt_with_header_is_read_as_csv(tmp_path):
    path, r = library(tmp_path, "lib.txt", b"ID,SMILES\nm1,CCO\nm2,CCN\n")
    assert r.schema["format"] == "csv" and r.schema["text_column"] == "SMILES" and r.schema["id_column"] == "ID"
    assert list(iter_library_rows(path, r.schema)) == [(0, "m1", "CCO"), (1, "m2", "CCN")]


def test_library_errors(tmp_path):
    with pytest.raises(IngestError) as err:
        library(tmp_path, "lib.csv", b"name,structure\na,CCO\n")
    assert "no column 'smiles'; columns are: name, structure" in err.value.message
    with pytest.raises(IngestError) as err:
        library(tmp_path, "lib.csv", b"smiles,id\nCCO,1\n", id_column="ident")
    assert "id column 'ident'" in err.value.message
    with pytest.raises(IngestError) as err:
        library(tmp_path, "lib.smi", b"# only comments\n\n")
    assert err.value.code == "no_rows"
    with pytest.raises(IngestError) as err:
        library(tmp_path, "lib.csv", b"smiles,id\n")
    assert err.value.code == "no_rows"
    p = tmp_path / "bomb.smi.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"C" * (3 << 20))
    with pytest.raises(IngestError) as err:
        ingest("library", str(p), p.name, None, {}, IngestLimits(max_line_bytes=1 << 20))
    assert err.value.code == "line_too_long"
    p = tmp_path / "trunc.smi.gz"
    p.write_bytes(gzip.compress(b"CCO a\n" * 5000)[:-20])
    with pytest.raises(IngestError) as err:
        ingest("library", str(p), p.name, None, {})
    assert err.value.code == "corrupt_gzip"
