"""Uploads say what was inferred, warn loudly, and refuse what cannot be used (issue 10)."""

from __future__ import annotations

import gzip
import io
import math
import random

import numpy as np
import pandas as pd
import pytest

from app.ingest import MIN_DATASET_ROWS, IngestError, ingest
from app.sample_data import solubility_csv
from tests.conftest import ApiClient
from tests.unit.test_api_datasets_models import stored, upload
from tests.unit.test_api_jobs import assert_error

MOLS = ["CCO", "CCN", "CCC", "c1ccccc1", "CC(=O)O", "CCCl", "CCBr", "OCCO", "CC#N", "C1CCCCC1", "CCOC", "NCCN"]


def write(tmp_path, name: str, content: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


def seqs(tmp_path, name: str, content: bytes, **options):
    return ingest("sequences", write(tmp_path, name, content), name, str(tmp_path / "w"), options)


def lib(tmp_path, name: str, content: bytes, **options):
    return ingest("library", write(tmp_path, name, content), name, None, options)


def csv_bytes(header: list[str], rows: list[list[object]]) -> bytes:
    return ("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n").encode()


# -- files that are not what they say, or not text ------------------------------------------


@pytest.mark.parametrize("kind", ["library", "sequences"])
def test_random_bytes_named_gz_are_refused(tmp_path, kind):
    rng = random.Random(10)
    with pytest.raises(IngestError) as err:
        ingest(kind, write(tmp_path, "x.gz", rng.randbytes(100)), "x.gz", str(tmp_path / "w"), {})
    assert err.value.code == "invalid_file"
    assert err.value.http_status == 422
    assert err.value.message.startswith("x.gz is not a gzip file")
    # plain text named .gz is refused too: the name promises gzip
    with pytest.raises(IngestError) as err:
        ingest(kind, write(tmp_path, "m.csv.gz", b"smiles,y\nCCO,1\n"), "m.csv.gz", str(tmp_path / "w"), {})
    assert err.value.code == "invalid_file"
    assert "m.csv.gz is not a gzip file" in err.value.message


@pytest.mark.parametrize("kind", ["library", "sequences"])
def test_gzip_of_binary_data_is_refused(tmp_path, kind):
    rng = random.Random(11)
    content = gzip.compress(rng.randbytes(5000))
    with pytest.raises(IngestError) as err:
        ingest(kind, write(tmp_path, "x.gz", content), "x.gz", str(tmp_path / "w"), {})
    assert err.value.code == "invalid_file"
    assert err.value.message.startswith("x.gz contains binary data, not text")


@pytest.mark.parametrize("kind", ["library", "sequences"])
def test_random_bytes_without_a_gz_name_are_refused(tmp_path, kind):
    rng = random.Random(12)
    for i in range(30):  # some draws have no NUL byte; every one must still be refused
        name = f"r{i}.smi" if kind == "library" else f"r{i}.csv"
        with pytest.raises(IngestError) as err:
            ingest(kind, write(tmp_path, name, rng.randbytes(100)), name, str(tmp_path / "w"), {})
        assert err.value.code in ("invalid_file", "unsupported_compression"), err.value


def test_utf16_and_latin1_text(tmp_path):
    with pytest.raises(IngestError) as err:
        seqs(tmp_path, "m.csv", "smiles,y\nCCO,1\n".encode("utf-16"))
    assert err.value.code == "invalid_file"
    assert "UTF-16" in err.value.message
    # Latin-1 text is text: one row with a non-UTF-8 byte is an invalid row, not a refusal
    r = seqs(tmp_path, "m.csv", b"smiles,y,note\nCCO,1,caf\xe9\nCCN,2,ok\nCCC,3,ok\n", label_columns="y")
    assert r.rows == 2
    assert r.invalid_rows == 1


def test_library_with_no_parseable_rows_is_refused(tmp_path):
    words = b"".join(b"hello%d world\n" % i for i in range(12))
    with pytest.raises(IngestError) as err:
        lib(tmp_path, "lib.smi", words)
    assert err.value.code == "no_valid_rows"
    assert err.value.http_status == 422
    assert "none of the 12 non-empty rows holds a valid SMILES" in err.value.message
    assert "row 0: 'hello0'" in err.value.message
    # too few rows to tell the wrong file from a file of bad molecules: accepted, loudly
    few = lib(tmp_path, "few.smi", b"hello world\nfoo bar\n")
    assert few.rows == 2 and few.warnings[0].startswith("none of the 2 non-empty rows holds a valid SMILES")
    with pytest.raises(IngestError) as err:
        lib(tmp_path, "lib.csv", b"smiles,id\n,a\n,b\n")
    assert err.value.code == "no_valid_rows"
    assert "empty" in err.value.message
    # the wrong column: names, not molecules
    with pytest.raises(IngestError) as err:
        lib(tmp_path, "lib.csv", b"id,smiles\n" + b"".join(b"C%s,name%d\n" % (b"C" * i, i) for i in range(12)))
    assert "is text_column right?" in err.value.message


def test_library_with_some_bad_rows_warns_and_says_what_it_read(tmp_path):
    r = lib(tmp_path, "lib.csv", b"Name,smiles\na,CCO\nb,C((C\nc,\nd,CCN\n")
    assert r.rows == 4
    assert r.stats["smiles_checked"]["rows"] == 3
    assert r.stats["smiles_checked"]["invalid"] == 1
    assert any(w.startswith("1 of the 3 non-empty rows are not valid SMILES (row 1: 'C((C')") for w in r.warnings)
    assert any("1 of 4 rows have no SMILES" in w for w in r.warnings)
    inferred = r.stats["inferred"]
    assert inferred["format"] == "csv"
    assert inferred["text_column"] == "smiles"
    assert inferred["id_column"] == "Name"
    assert "comma-delimited" in inferred["summary"]
    assert "id column 'Name'" in inferred["summary"]


# -- label types --------------------------------------------------------------------------


def test_numeric_column_with_a_stray_string_stays_float(tmp_path):
    rng = np.random.default_rng(0)
    values: list[object] = [f"{v:.3f}" for v in rng.normal(size=1000)]
    values[17] = "oops"
    rows = [[MOLS[i % len(MOLS)], v] for i, v in enumerate(values)]
    r = seqs(tmp_path, "sol.csv", csv_bytes(["smiles", "solubility"], rows))
    assert r.schema["label_types"] == {"solubility": "float"}
    assert "column 'solubility': 1 non-numeric value treated as missing (row 17: 'oops')" in r.warnings
    assert r.stats["labels"]["solubility"]["non_numeric"] == 1
    assert r.stats["labels"]["solubility"]["missing"] == 1
    assert r.stats["labels"]["solubility"]["count"] == 999
    df = pd.read_parquet(r.data_path)
    assert math.isnan(df.solubility[17])
    assert df.solubility.notna().sum() == 999
    # a missing-value marker ("n/a") is simply missing, with no warning
    values[17] = "n/a"
    r = seqs(
        tmp_path,
        "sol.csv",
        csv_bytes(["smiles", "solubility"], [[m, v] for (m, _), v in zip(rows, values, strict=True)]),
    )
    assert r.schema["label_types"] == {"solubility": "float"}
    assert not any("non-numeric" in w for w in r.warnings)


def test_integer_classes_with_a_stray_string(tmp_path):
    labels: list[object] = [i % 2 for i in range(40)]
    labels[3] = "?"
    r = seqs(tmp_path, "tox.csv", csv_bytes(["smiles", "toxic"], [[MOLS[i % 12], y] for i, y in enumerate(labels)]))
    assert r.schema["label_types"] == {"toxic": "category"}
    assert r.schema["classes"] == {"toxic": [0, 1]}
    assert any(w.startswith("column 'toxic': 1 non-numeric value treated as missing (row 3: '?')") for w in r.warnings)
    assert r.stats["labels"]["toxic"]["class_counts"] == {"0": 20, "1": 19}
    df = pd.read_parquet(r.data_path)
    assert df.toxic.isna().tolist() == [i == 3 for i in range(40)]


def test_genuinely_mixed_column_is_categorical_and_says_why(tmp_path):
    labels = ["1", "2", "high", "low", "1", "high", "2", "low", "1", "2", "low", "high"]
    r = seqs(
        tmp_path,
        "m.csv",
        csv_bytes(["smiles", "grade"], [[m, g] for m, g in zip(MOLS, labels, strict=True)]),
        label_columns="grade",
    )
    assert r.schema["label_types"] == {"grade": "category"}
    assert r.schema["classes"] == {"grade": ["1", "2", "high", "low"]}
    warning = next(w for w in r.warnings if "mixes numbers and text" in w)
    assert "6 numeric, 6 text values" in warning
    assert "treated as categorical because 50%" in warning


# -- which columns are labels -------------------------------------------------------------


def test_demo_csv_split_and_name_are_not_labels(tmp_path):
    path = solubility_csv(tmp_path / "solubility.csv")
    r = ingest("sequences", str(path), "solubility.csv", str(tmp_path / "w"), {})
    assert r.schema["label_columns"] == ["solubility"]
    assert r.schema["label_types"] == {"solubility": "float"}
    assert r.warnings[0] == (
        "label columns inferred: solubility (float); ignored: name (identifier), "
        "split (split assignment); pass label_columns=... to choose"
    )
    inferred = r.stats["inferred"]
    assert inferred["label_columns"] == [{"name": "solubility", "type": "float"}]
    assert inferred["ignored_columns"] == [
        {"name": "name", "reason": "identifier"},
        {"name": "split", "reason": "split assignment"},
    ]
    assert inferred["text_column"] == "smiles"
    assert inferred["delimiter"] == ","
    assert inferred["tokenizer"] == "smiles"
    assert inferred["label_columns_source"] == "inferred"
    assert list(pd.read_parquet(r.data_path).columns) == ["text", "source_row", "solubility"]
    # an explicit label_columns always wins, split included
    r = ingest("sequences", str(path), "solubility.csv", str(tmp_path / "w2"), {"label_columns": "solubility,split"})
    assert r.schema["label_types"] == {"solubility": "float", "split": "category"}
    assert r.schema["classes"] == {"split": ["test", "train"]}
    assert not any("ignored" in w for w in r.warnings)
    assert r.stats["inferred"]["label_columns_source"] == "option"


def test_identifier_and_fold_columns_are_not_labels(tmp_path):
    header = [
        "compound_id",
        "smiles",
        "molName",
        "fold",
        "subset",
        "solid",
        "pIC50",
        "active",
        "alias",
        "Parent SMILES",
    ]
    rows = [
        [
            1000 + i,
            MOLS[i],
            f"mol {i}",
            i % 3,
            ["train", "valid", "test"][i % 3],
            i % 2,
            round(5 + i / 7, 3),
            ["yes", "no"][i % 2],
            f"a{i}",
            MOLS[i],
        ]
        for i in range(12)
    ]
    r = seqs(tmp_path, "m.csv", csv_bytes(header, rows))
    assert r.schema["label_types"] == {"solid": "category", "pIC50": "float", "active": "category"}
    ignored = {c["name"]: c["reason"] for c in r.stats["inferred"]["ignored_columns"]}
    assert ignored["compound_id"] == "identifier"
    assert ignored["molName"] == "identifier"
    assert ignored["fold"] == ignored["subset"] == "split assignment"
    assert ignored["Parent SMILES"] == "another structure column"
    assert ignored["alias"].startswith("identifier: 12 distinct values in 12 rows")
    assert "pass label_columns=... to choose" in r.warnings[0]


def test_no_label_columns_at_all_is_said(tmp_path):
    r = seqs(tmp_path, "m.csv", csv_bytes(["smiles", "id"], [[m, i] for i, m in enumerate(MOLS)]))
    assert r.schema["label_columns"] == []
    assert r.warnings[0].startswith("label columns inferred: none; ignored: id (identifier)")


# -- sizes --------------------------------------------------------------------------------


def test_too_few_rows_is_accepted_with_a_loud_warning(tmp_path):
    r = seqs(tmp_path, "m.csv", b"smiles,y\nCCO,1.5\nCCN,2.5\nXX,3\n")
    assert r.rows == 2
    assert r.warnings[0] == f"only 2 valid rows: too few to train; training needs at least {MIN_DATASET_ROWS}"
    r = seqs(tmp_path, "m.csv", csv_bytes(["smiles", "y"], [[m, i] for i, m in enumerate(MOLS)]))
    assert not any("too few to train" in w for w in r.warnings)
    npz = io.BytesIO()
    np.savez(npz, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.array([[0], [1], [0]]))
    r = ingest("images", write(tmp_path, "tiny.npz", npz.getvalue()), "tiny.npz", str(tmp_path / "wi"), {})
    assert r.warnings[0].startswith("only 3 valid rows: too few to train")
    assert "8x8 images" in r.stats["inferred"]["summary"]


# -- the upload response ------------------------------------------------------------------


def test_upload_response_says_what_was_inferred(api: ApiClient, app, tmp_path) -> None:
    path = solubility_csv(tmp_path / "solubility.csv")
    resp = upload(api, "sequences", "solubility.csv", path.read_bytes())
    assert resp.status_code == 201, resp.get_json()
    ds = resp.get_json()
    assert ds["schema"]["label_columns"] == ["solubility"]
    assert ds["schema"]["label_types"] == {"solubility": "float"}
    assert ds["warnings"] == ds["stats"]["warnings"]
    assert "split (split assignment)" in ds["warnings"][0]
    assert ds["inferred"] == ds["stats"]["inferred"]
    assert ds["inferred"]["summary"].startswith("text column 'smiles' (default); comma-delimited (detected)")
    assert api.get(f"/api/v1/datasets/{ds['id']}").get_json()["inferred"] == ds["inferred"]
    before = stored(app)
    err = assert_error(upload(api, "library", "x.gz", random.Random(1).randbytes(100)), 422, "invalid_file")
    assert err["message"].startswith("x.gz is not a gzip file")
    err = assert_error(
        upload(api, "sequences", "y.csv.gz", gzip.compress(random.Random(2).randbytes(999))), 422, "invalid_file"
    )
    assert "contains binary data, not text" in err["message"]
    assert stored(app) == before
