"""DICOM de-identification on ingest (issue 11, item 3): real pydicom-data files carrying a
patient's identifiers are uploaded as an image dataset; afterwards no identifier byte string
is anywhere under the artifact root or in the database, UIDs map consistently within a
tenant and differently across tenants, and the de-identified dataset still trains."""
from __future__ import annotations

import base64
import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import inspect, select, text

from app.ingest.deid import Deidentifier, NotDeidentifiable, tenant_seed
from app.models import Dataset, Job
from tests.conftest import ApiClient, create_tenant_key
from tests.fixtures.ingest_files import png_bytes
from tests.unit.test_predict_api import add_model

# pydicom-data files whose pixels decode: CT and MR (int16), RGB, palette colour, JPEG 2000
SOURCES = ("CT_small.dcm", "MR_small.dcm", "SC_rgb.dcm", "OBXXXX1A.dcm", "JPEG2000.dcm")
PATIENT = {
    "PatientName": "DOE^JANE^ZQXW",
    "PatientID": "MRN-7731-ZQXW",
    "PatientBirthDate": "19610823",
    "OtherPatientIDs": "OPID-5521-QQ",
    "InstitutionName": "St Zqxwine Memorial Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY^QQX",
    "AccessionNumber": "ACC-88412",
    "StudyDescription": "CT chest of Jane Doe ZQXW",
    "ImageComments": "patient Jane Doe, MRN-7731-ZQXW",
}
PRIVATE_NOTE = "JANE DOE ZQXW 1961-08-23"
# Strings the patient's identity shows through; none may survive anywhere.
IDENTIFIERS = ["ZQXW", "Zqxw", "zqxw", "DOE^JANE", "MRN-7731", "19610823", "1961-08-23", "OPID-5521",
               "HOUSE^GREGORY", "ACC-88412", "Jane Doe", "Jane_Doe", "DOE_JANE"]


def identified(name: str, sop_suffix: str = "") -> pydicom.Dataset:
    """A real test file carrying the patient's identifiers, a private tag with the name, and
    (sop_suffix) its own SOP instance UID."""
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.private_block(0x0011, "ZQXW HOSPITAL PACS", create=True).add_new(0x01, "LO", PRIVATE_NOTE)
    if sop_suffix:
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[name, sop_suffix])
    return ds


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def patient_zip() -> tuple[bytes, list[str], list[str]]:
    """(zip, original UIDs, original member names): two class folders of real DICOM files
    named after the patient, one broken .dcm and one broken PNG named after her too."""
    entries: dict[str, bytes] = {}
    uids: list[str] = []
    for cls in ("normal", "abnormal"):
        for i, name in enumerate(SOURCES):
            ds = identified(name, f"{len(cls)}{i}")
            uids += [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
            entries[f"DOE_JANE_ZQXW/{cls}/Jane_Doe_ZQXW_{i}.dcm"] = to_bytes(ds)
    # no preamble, no extension: recognised by its first tag
    bare = identified("MR_small.dcm", "bare")
    bare.preamble = None
    uids.append(str(bare.SOPInstanceUID))
    buf = io.BytesIO()
    bare.save_as(buf, enforce_file_format=False)
    entries["DOE_JANE_ZQXW/abnormal/Jane_Doe_ZQXW_export"] = buf.getvalue()
    entries["DOE_JANE_ZQXW/abnormal/DOE_JANE_ZQXW_scan.dcm"] = b"DICM? no: notes on DOE^JANE^ZQXW " * 20
    entries["DOE_JANE_ZQXW/normal/Jane_Doe_ZQXW_photo.png"] = b"\x89PNG\r\n\x1a\n DOE^JANE^ZQXW"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in entries.items():
            zf.writestr(member, data)
    return buf.getvalue(), sorted(set(uids)), list(entries)


def upload(api: ApiClient, payload: bytes, filename: str = "DOE_JANE_ZQXW_scans.zip", **form: str):  # noqa: ANN201
    data = {"kind": "images", "file": (io.BytesIO(payload), filename), **form}
    return api.post("/api/v1/datasets", data=data, content_type="multipart/form-data")


def hits(blob: bytes, needles: list[bytes], where: str) -> list[str]:
    return [f"{where}: {n!r}" for n in needles if n in blob]


def artifact_hits(root: Path, needles: list[bytes]) -> list[str]:
    """Identifier byte strings in every file under root (raw bytes, zip members
    uncompressed) and in every path."""
    found = []
    for path in sorted(root.rglob("*")):
        found += hits(str(path.relative_to(root)).encode(), needles, f"path {path}")
        if not path.is_file():
            continue
        raw = path.read_bytes()
        found += hits(raw, needles, str(path))
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    found += hits(member.encode() + zf.read(member), needles, f"{path}!{member}")
    return found


def database_hits(app, needles: list[bytes]) -> list[str]:  # noqa: ANN001
    """Identifier byte strings in the SQLite files' bytes and in a dump of every table."""
    settings = app.extensions["medmaas.settings"]
    db = app.extensions["medmaas.db"]
    found = []
    with db.engine.connect() as conn:
        conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        for table in inspect(conn).get_table_names():
            dump = "\n".join(repr(tuple(row)) for row in conn.execute(text(f'SELECT * FROM "{table}"')))
            found += hits(dump.encode(), needles, f"table {table}")
    for path in settings.home.glob("medmaas.db*"):
        found += hits(path.read_bytes(), needles, str(path))
    return found


def needles_of(uids: list[str], names: list[str]) -> list[bytes]:
    parts = {p for n in names for p in n.split("/")} - {"normal", "abnormal"}
    return sorted({s.encode() for s in IDENTIFIERS + uids} | {p.encode() for p in parts})


@pytest.fixture()
def spool_dir(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """The temporary directory uploads are spooled in, watched by the tests."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return spool


@pytest.fixture()
def tenants(app, client):  # noqa: ANN001, ANN201
    return [(tid, ApiClient(client, key)) for tid, key in (create_tenant_key(app), create_tenant_key(app))]


def dicom_index(app, dataset: dict) -> list[dict]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        ds = s.get(Dataset, dataset["id"])
        data = Path(ds.data_uri.removeprefix("file://"))
    return [json.loads(line) for line in (data.parent / "dicom_index.jsonl").read_text().splitlines()]


def test_no_identifier_survives_an_upload(app, tenants, spool_dir) -> None:  # noqa: ANN001
    (tid, api), _ = tenants
    payload, uids, names = patient_zip()
    needles = needles_of(uids, names)
    assert len(hits(payload, needles, "upload")) > 10  # the upload really carries them

    r = upload(api, payload, options=json.dumps({"image_size": 32}))
    assert r.status_code == 201, r.get_json()
    ds = r.get_json()
    assert ds["rows"] == 11 and ds["invalid_rows"] == 2
    assert ds["stats"]["file_formats"] == {"DICOM": 11}
    assert ds["stats"]["deidentification"] == {"profile": "PS3.15 Annex E basic", "tool": "dicognito 0.19.0",
                                               "dicom_files": 11, "index": "dicom_index.jsonl"}
    # invalid files are named by position and say why
    reasons = {s["file"]: s["reason"] for s in ds["invalid_samples"]}
    assert set(reasons) == {"file 12", "file 13"}, reasons
    assert "DICOM" in reasons["file 12"] and "PNG" in reasons["file 13"]
    assert ds["filename"].startswith("images-") and ds["filename"].endswith(".zip")
    assert ds["name"] == ds["filename"]

    settings = app.extensions["medmaas.settings"]
    found = (artifact_hits(settings.artifacts, needles) + database_hits(app, needles)
             + hits(json.dumps(api.get(f"/api/v1/datasets/{ds['id']}").get_json()).encode(), needles, "API"))
    print(f"identifier hits after a DICOM upload: {len(found)} ({len(needles)} identifiers searched)")
    assert found == []
    # the raw upload is not kept: the dataset folder holds the pixels and the index only
    files = sorted(p.name for p in settings.artifacts.rglob("*") if p.is_file())
    assert files == ["data.npz", "dicom_index.jsonl"]
    assert list(spool_dir.iterdir()) == []  # the spool was an unlinked file, gone with the request
    with app.extensions["medmaas.db"].session() as s:
        row = s.scalar(select(Dataset))
        assert row.uri == row.data_uri and row.uri.endswith("/data.npz")

    # the dataset page shows the method, and nothing identifying
    page = signed_in(app, api.key).get(f"/datasets/{ds['id']}")
    assert page.status_code == 200
    assert b"11 DICOM files de-identified on upload: DICOM PS3.15 Annex E basic profile" in page.data
    assert hits(page.data, needles, "page") == []


def signed_in(app, key: str):  # noqa: ANN001, ANN201
    browser = app.test_client()
    browser.get("/login")
    with browser.session_transaction() as sess:
        csrf = sess["csrf"]
    assert browser.post("/login", data={"api_key": key, "csrf_token": csrf}).status_code == 302
    return browser


def test_rejected_upload_leaves_nothing(app, tenants, spool_dir) -> None:  # noqa: ANN001
    (tid, api), _ = tenants
    entry = to_bytes(identified("CT_small.dcm"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("DOE_JANE_ZQXW/only_class/a.dcm", entry)
        zf.writestr("DOE_JANE_ZQXW/only_class/b.dcm", entry)
    r = upload(api, buf.getvalue())
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "invalid_layout"
    settings = app.extensions["medmaas.settings"]
    assert [p for p in settings.artifacts.rglob("*") if p.is_file()] == []
    assert list(spool_dir.iterdir()) == []


def test_uids_consistent_within_a_tenant_and_different_across(app, tenants) -> None:  # noqa: ANN001
    (_, api_a), (_, api_b) = tenants
    payload, uids, _ = patient_zip()
    first, again = (upload(api_a, payload).get_json() for _ in range(2))
    other = upload(api_b, payload).get_json()
    a1, a2, b = (dicom_index(app, d) for d in (first, again, other))
    key = lambda rows: [(r["file"], r["patient_id"], r["study_uid"], r["series_uid"], r["sop_uid"]) for r in rows]  # noqa: E731
    assert key(a1) == key(a2)  # same tenant: the same original UID always maps to the same new one
    assert len({r["sop_uid"] for r in a1}) == 11  # distinct instances stay distinct
    assert len({r["patient_id"] for r in a1}) == 1  # one patient stays one (pseudonymous) patient
    ids = lambda rows, k: {r[k] for r in rows}  # noqa: E731
    for k in ("patient_id", "study_uid", "series_uid", "sop_uid"):
        assert not ids(a1, k) & ids(b, k), k  # another tenant gets unrelated ids
        assert not ids(a1, k) & set(uids)
    assert all(r["sop_uid"].startswith("2.") for r in a1)


def test_deidentified_file_follows_annex_e() -> None:
    original = identified("CT_small.dcm")
    original.file_meta.SourceApplicationEntityTitle = "ZQXW_PACS"
    original.add_new(0x60003000, "OW", b"\xff" * 32)  # overlay data: may draw the name
    original.add_new(0x60004000, "LT", "DOE^JANE^ZQXW")  # overlay comments
    original.PatientAge, original.PatientWeight = "063Y", 71
    raw, _ = Deidentifier(tenant_seed("k", 1)).file(to_bytes(original))
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert 0x60003000 not in ds and 0x60004000 not in ds and "PatientAge" not in ds and "PatientWeight" not in ds
    assert ds.PatientIdentityRemoved == "YES"
    assert "PS3.15 Annex E basic" in ds.DeidentificationMethod and "dicognito" in ds.DeidentificationMethod
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert all(c.CodingSchemeDesignator == "DCM" for c in ds.DeidentificationMethodCodeSequence)
    assert not any(el.tag.is_private for el in ds.iterall())
    assert "StudyDescription" not in ds and "ImageComments" not in ds
    assert ds.PatientBirthDate == "" and str(ds.PatientName) != PATIENT["PatientName"]
    assert ds.StudyDate != original.StudyDate  # dates shifted ...
    assert ds.SOPClassUID == original.SOPClassUID  # ... class UIDs kept, instance UIDs replaced
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID != original.SOPInstanceUID
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)  # pixels untouched
    assert hits(raw, [s.encode() for s in IDENTIFIERS], "file") == []


def test_burned_in_annotation_refused() -> None:
    ds = identified("US1_UNCR.dcm")
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(NotDeidentifiable, match="burned-in"):
        Deidentifier(None).file(to_bytes(ds))


def test_tenant_seed_needs_the_secret_key() -> None:
    assert tenant_seed("secret", 1) == tenant_seed("secret", 1)
    assert len({tenant_seed("secret", 1), tenant_seed("secret", 2), tenant_seed("other", 1)}) == 3
    with pytest.raises(ValueError):
        tenant_seed("", 1)


def test_predict_stores_dicom_inputs_deidentified(app, tenants) -> None:  # noqa: ANN001
    (tid, api), _ = tenants
    add_model(app, tid, name="cxr", input_kind="image")
    dicom = to_bytes(identified("MR_small.dcm"))
    inputs = [{"image_base64": base64.b64encode(dicom).decode()},
              {"image_base64": base64.b64encode(png_bytes()).decode()}]
    r = api.post("/api/v1/models/cxr/predict", json={"inputs": inputs, "timeout": 0})
    assert r.status_code == 202, r.get_json()
    with app.extensions["medmaas.db"].session() as s:
        spec = s.get(Job, r.get_json()["id"]).spec
    stored = [base64.b64decode(x["image_base64"]) for x in spec["inputs"]]
    assert [set(x) for x in spec["inputs"]] == [{"image_base64"}] * 2  # nothing else (file names) kept
    assert stored[1] == png_bytes()
    ds = pydicom.dcmread(io.BytesIO(stored[0]))
    assert ds.PatientIdentityRemoved == "YES"
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(io.BytesIO(dicom)).pixel_array)
    needles = [s.encode() for s in IDENTIFIERS]
    assert hits(stored[0], needles, "stored input") == [] and database_hits(app, needles) == []

    garbage = b"\0" * 128 + b"DICM" + b"DOE^JANE^ZQXW" * 3
    r = api.post("/api/v1/models/cxr/predict", json={"inputs": [{"image_base64": base64.b64encode(garbage).decode()}],
                                                      "timeout": 0})
    assert r.status_code == 422 and "de-identified" in r.get_json()["error"]["message"], r.get_json()


def test_training_on_the_deidentified_dataset(app, tenants) -> None:  # noqa: ANN001
    torch = pytest.importorskip("torch")
    from workers.ml.data import load_image_npz
    from workers.ml.models import build_model
    from workers.ml.training import TrainConfig, fit, seed_everything

    torch.set_num_threads(1)
    (_, api), _ = tenants
    ds = upload(api, patient_zip()[0], options=json.dumps({"image_size": 16})).get_json()
    with app.extensions["medmaas.db"].session() as s:
        path = Path(s.get(Dataset, ds["id"]).data_uri.removeprefix("file://"))
    data = load_image_npz(path, split={"train": 0.6, "val": 0.2, "test": 0.2}, class_names=ds["schema"]["classes"])
    seed_everything(0)
    model = build_model("cnn", {"in_channels": 3, "image_size": [16, 16], "num_outputs": 2,
                                "channels": [4], "hidden": 8})
    result = fit(model, data, TrainConfig(epochs=2, batch_size=4, device="cpu"))
    assert result["epochs_trained"] == 2 and np.isfinite(result["history"][-1]["train_loss"])


def test_deleting_the_dataset_erases_the_index_too(app, tenants) -> None:  # noqa: ANN001
    (_, api), _ = tenants
    ds = upload(api, patient_zip()[0], options=json.dumps({"image_size": 16})).get_json()
    settings = app.extensions["medmaas.settings"]
    assert {p.name for p in settings.artifacts.rglob("*") if p.is_file()} == {"data.npz", "dicom_index.jsonl"}
    assert api.client.delete(f"/api/v1/datasets/{ds['id']}", headers=api.headers).status_code == 204
    assert [p for p in settings.artifacts.rglob("*") if p.is_file()] == []
