"""Image datasets: MedMNIST-layout npz and zips of class folders (PNG, JPEG, DICOM)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from app.ingest import IngestError, IngestLimits, ingest
from app.ingest.images import ingest_images
from tests.fixtures.ingest_files import (DICOM_FILES, dicom_bytes, digits, digits_npz, jpeg_bytes, make_zip,
                                         png_bytes)


def load(report) -> dict[str, np.ndarray]:
    with np.load(report.data_path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# -- npz -------------------------------------------------------------------------

def test_npz_happy_path(tmp_path):
    src = digits_npz(tmp_path / "digits.npz")
    r = ingest("images", str(src), "digits.npz", str(tmp_path / "w"), {})
    x, y = digits()
    assert r.rows == 1797 and r.invalid_rows == 0
    assert r.schema == {"kind": "images", "shape": [8, 8, 1], "classes": 10, "label_kind": "multiclass",
                        "splits": {"train": 1200, "val": 300, "test": 297}, "layout": "NHWC"}
    assert sum(r.stats["label_counts"]["train"].values()) == 1200
    assert r.stats["label_counts"]["train"]["0"] == int((y[:1200] == 0).sum())
    out = load(r)
    assert out["train_images"].shape == (1200, 8, 8, 1) and out["train_images"].dtype == np.uint8
    np.testing.assert_array_equal(out["test_images"][..., 0], x[1500:])
    assert out["val_labels"].shape == (300, 1) and out["val_labels"].dtype == np.int64
    np.testing.assert_array_equal(out["val_labels"][:, 0], y[1200:1500])


def test_npz_flat_labels_resize_and_names(tmp_path):
    src = digits_npz(tmp_path / "d.npz", splits=(500, 0, 0), label_shape="n")
    names = [f"digit{i}" for i in range(10)]
    r = ingest_images(str(src), "d.npz", str(tmp_path / "w"), options={"image_size": "16", "classes": names})
    assert r.schema["shape"] == [16, 16, 1] and r.schema["classes"] == names
    assert set(r.stats["label_counts"]["train"]) == set(names)
    assert load(r)["train_images"].shape == (500, 16, 16, 1)


def test_npz_multilabel_rgb(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (20, 12, 12, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (20, 4), dtype=np.int64)
    np.savez(tmp_path / "m.npz", train_images=x, train_labels=y)
    r = ingest("images", str(tmp_path / "m.npz"), "m.npz", str(tmp_path / "w"), {})
    assert r.schema["label_kind"] == "multilabel" and r.schema["classes"] == 4
    assert r.stats["label_counts"]["train"] == {str(i): int(y[:, i].sum()) for i in range(4)}
    out = load(r)
    np.testing.assert_array_equal(out["train_images"], x)
    assert out["train_labels"].dtype == np.uint8


def test_corrupt_npz(tmp_path):
    good = digits_npz(tmp_path / "d.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.npz").write_bytes(b"\x93NUMPY garbage" * 10)
    for name in ("trunc.npz", "junk.npz"):
        with pytest.raises(IngestError) as err:
            ingest("images", str(tmp_path / name), name, str(tmp_path / "w"), {})
        assert err.value.http_status == 422
    assert not (tmp_path / "w" / "data.npz").exists()


def test_npz_pickled_object_arrays_refused(tmp_path):
    x, y = digits(50)
    np.savez(tmp_path / "obj.npz", train_images=np.array([object()] * 50, dtype=object), train_labels=y)
    np.savez(tmp_path / "objl.npz", train_images=x, train_labels=np.array([{"a": 1}] * 50, dtype=object))
    for name in ("obj.npz", "objl.npz"):
        with pytest.raises(IngestError) as err:
            ingest("images", str(tmp_path / name), name, str(tmp_path / "w"), {})
        assert err.value.code == "pickled_data"
        assert "pickle" in err.value.message


@pytest.mark.parametrize("arrays, fragment", [
    (lambda x, y: {"train_images": x}, "no train_labels"),
    (lambda x, y: {"images": x, "labels": y}, "no train_images or train_labels"),
    (lambda x, y: {"train_images": x, "train_labels": y[:-1]}, "to match 50 train images"),
    (lambda x, y: {"train_images": x.astype(np.float32), "train_labels": y}, "dtype float32"),
    (lambda x, y: {"train_images": x[:, 0], "train_labels": y}, "expected (N, H, W)"),
    (lambda x, y: {"train_images": x, "train_labels": y, "val_images": x}, "val_images but no val_labels"),
    (lambda x, y: {"train_images": x, "train_labels": y.astype(np.int64) - 1}, "negative"),
    (lambda x, y: {"train_images": x, "train_labels": y * 0}, "at least two classes"),
])
def test_npz_layout_errors(tmp_path, arrays, fragment):
    x, y = digits(50)
    np.savez(tmp_path / "bad.npz", **arrays(x, y))
    with pytest.raises(IngestError) as err:
        ingest("images", str(tmp_path / "bad.npz"), "bad.npz", str(tmp_path / "w"), {})
    assert fragment in err.value.message


def test_output_size_cap(tmp_path):
    src = digits_npz(tmp_path / "d.npz")
    with pytest.raises(IngestError) as err:
        ingest("images", str(src), "d.npz", str(tmp_path / "w"), {"image_size": 256},
               IngestLimits(max_output_bytes=10 << 20))
    assert err.value.http_status == 413 and "image_size" in err.value.message


# -- zip of class folders -------------------------------------------------------------

def test_zip_png_jpeg_dicom(tmp_path):
    entries = {
        "study/normal/a.png": png_bytes((32, 32)),
        "study/normal/b.png": png_bytes((32, 32), "I;16", seed=2),  # 16-bit greyscale
        "study/normal/c.jpg": jpeg_bytes((48, 40)),
        "study/normal/broken.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
        "study/abnormal/patient1/ct.dcm": dicom_bytes(DICOM_FILES[0]),
        "study/abnormal/patient1/mr": dicom_bytes(DICOM_FILES[1]),  # no extension: found by 'DICM' magic
        "study/abnormal/notes.txt": b"not an image",
        "study/README.md": b"hi",
        "__MACOSX/study/._a.png": b"junk",
        "study/.DS_Store": b"junk",
    }
    z = make_zip(tmp_path / "study.zip", entries)
    r = ingest("images", str(z), "study.zip", str(tmp_path / "w"), {})
    assert r.schema["classes"] == ["abnormal", "normal"]
    assert r.schema["shape"] == [32, 32, 3]  # most common size; colour because the JPEG is RGB
    assert r.schema["splits"] == {"train": 5}
    assert r.rows == 5 and r.invalid_rows == 3
    # files are named by their position in the archive, never by their names
    reasons = {s["file"]: s["reason"] for s in r.invalid_samples}
    assert "not a readable PNG" in reasons["file 4"]
    assert "unsupported file type: '.txt'" in reasons["file 7"]
    assert "not inside a class folder" in reasons["file 8"]
    assert "/w/" not in str(r.invalid_samples)  # no server paths leak into messages
    assert not any(n in str(r.to_dict()) for n in ("broken", "notes", "README", "patient1"))
    assert r.stats["file_formats"] == {"PNG": 2, "JPEG": 1, "DICOM": 2}
    assert r.stats["label_counts"]["train"] == {"abnormal": 2, "normal": 3}
    json.dumps(r.to_dict(), allow_nan=False)
    out = load(r)
    assert out["train_images"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(out["train_labels"][:, 0], [0, 0, 1, 1, 1])
    assert all(img.max() > img.min() for img in out["train_images"])  # every image has content
    assert r.stats["deidentification"] == {"profile": "PS3.15 Annex E basic", "tool": "dicognito 0.19.0",
                                           "dicom_files": 2, "index": "dicom_index.jsonl"}
    index = [json.loads(line) for line in (tmp_path / "w" / "dicom_index.jsonl").read_text().splitlines()]
    assert [(x["split"], x["row"], x["file"]) for x in index] == [("train", 0, "file 5"), ("train", 1, "file 6")]
    # temp files cleaned up
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["data.npz", "dicom_index.jsonl"]


def test_zip_dicom_windowing_and_monochrome1(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    z = make_zip(tmp_path / "d.zip", {
        "a/mr2.dcm": dicom_bytes("MR_small.dcm"),
        "b/mr1.dcm": dicom_bytes("MR_small.dcm", photometric="MONOCHROME1"),
    })
    r = ingest("images", str(z), "d.zip", str(tmp_path / "w"), {})
    out = load(r)["train_images"][..., 0].astype(int)
    assert r.schema["shape"] == [64, 64, 1]
    # MONOCHROME1 is the inverse display of the same pixels
    np.testing.assert_array_equal(out[0] + out[1], np.full((64, 64), 255))
    # MR_small carries a window (centre 600, width 1600): values above the window saturate
    px = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    assert (out[0][px >= 600 + 800] == 255).all() and (out[0][px < 600 - 800] == 0).all()


def test_zip_split_folders(tmp_path):
    entries = {f"{split}/{cls}/{i}.png": png_bytes((16, 16), seed=i)
               for split, n in (("train", 3), ("val", 2), ("test", 1)) for cls in ("cat", "dog") for i in range(n)}
    r = ingest("images", str(make_zip(tmp_path / "s.zip", entries)), "s.zip", str(tmp_path / "w"),
               {"image_size": [8, 12]})
    assert r.schema["splits"] == {"train": 6, "val": 4, "test": 2}
    assert r.schema["shape"] == [8, 12, 1]
    out = load(r)
    assert out["val_images"].shape == (4, 8, 12, 1)
    np.testing.assert_array_equal(out["test_labels"][:, 0], [0, 1])


def test_zip_layout_errors(tmp_path):
    one = make_zip(tmp_path / "one.zip", {"only/a.png": png_bytes(), "only/b.png": png_bytes()})
    mixed = make_zip(tmp_path / "mixed.zip", {"train/a/x.png": png_bytes(), "b/y.png": png_bytes()})
    empty = make_zip(tmp_path / "empty.zip", {"a.png": png_bytes()})
    unreadable = make_zip(tmp_path / "bad.zip", {"a/x.png": b"nope", "b/y.png": b"nope"})
    for z, code in ((one, "invalid_layout"), (mixed, "invalid_layout"), (empty, "no_images"),
                    (unreadable, "no_valid_images")):
        with pytest.raises(IngestError) as err:
            ingest("images", str(z), z.name, str(tmp_path / "w"), {})
        assert err.value.code == code
    assert "one class folder" in str(pytest.raises(IngestError, ingest, "images", str(one), "one.zip",
                                                   str(tmp_path / "w"), {}).value)


def test_not_an_archive_and_bad_options(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(png_bytes())
    with pytest.raises(IngestError) as err:
        ingest("images", str(p), "x.png", str(tmp_path / "w"), {})
    assert "npz or zip" in err.value.message
    with pytest.raises(IngestError) as err:
        ingest("images", str(p), "x.png", str(tmp_path / "w"), {"imagesize": 3})
    assert err.value.code == "unknown_option" and "image_size" in err.value.message
    with pytest.raises(IngestError):
        ingest("images", str(p), "x.png", str(tmp_path / "w"), {"image_size": "big"})
    with pytest.raises(IngestError) as err:
        ingest("pictures", str(p), "x.png", str(tmp_path / "w"), {})
    assert err.value.code == "invalid_kind"
