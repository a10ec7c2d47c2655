"""DICOM de-identification on PostgreSQL: after an upload of real DICOM files carrying a
patient's identifiers, no identifier is in any table of the database nor under the upload's
dataset folder; a second upload by the same tenant maps UIDs the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from app.models import Dataset
from tests.conftest import ApiClient, create_tenant_key
from tests.unit.test_deid import artifact_hits, hits, needles_of, patient_zip, upload

pytestmark = pytest.mark.integration


def test_no_identifier_in_postgresql_or_on_disk(pg_app) -> None:  # noqa: ANN001
    api = ApiClient(pg_app.test_client(), create_tenant_key(pg_app)[1])
    payload, uids, names = patient_zip()
    needles = needles_of(uids, names)
    first, again = (upload(api, payload) for _ in range(2))
    assert first.status_code == again.status_code == 201, first.get_json()

    db = pg_app.extensions["medmaas.db"]
    found = []
    with db.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            rows = conn.execute(text(f'SELECT CAST(t AS text) FROM "{table}" AS t')).scalars()
            found += hits("\n".join(rows).encode(), needles, f"table {table}")
    folders = []
    with db.session() as s:
        for ds in (first.get_json(), again.get_json()):
            folder = Path(s.get(Dataset, ds["id"]).data_uri.removeprefix("file://")).parent
            folders.append(folder)
            found += artifact_hits(folder, needles)
    assert found == []
    index = [[json.loads(line)["sop_uid"] for line in (f / "dicom_index.jsonl").read_text().splitlines()]
             for f in folders]
    assert index[0] == index[1] and not set(index[0]) & set(uids)
