"""Hostile input is a 4xx with the standard error body and changes nothing (issue 11): ids
past the 32-bit id columns, deeply nested or unparseable JSON, out-of-range form fields;
and score CSVs carry no spreadsheet formulas (OWASP CSV injection), Parquet raw values."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from app.api import MAX_ID
from app.factory import MAX_JSON_DEPTH, json_depth
from app.kinds.score import csv_from_parquet
from app.models import ApiKey, Job
from tests.conftest import ApiClient, create_tenant_key, sign_in
from workers.scoring import table as tbl

BIG = [MAX_ID + 1, 2**63, 2**64 + 7, 10**40]


def job_count(app) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def assert_standard_error(r, status: int) -> dict:  # noqa: ANN001
    assert r.status_code == status, r.get_data(as_text=True)[:500]
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


@pytest.mark.parametrize("big", BIG)
def test_ids_past_the_id_columns_are_not_found(api: ApiClient, app, big: int) -> None:  # noqa: ANN001
    for path in (f"/api/v1/jobs/{big}", f"/api/v1/jobs/{big}/events", f"/api/v1/jobs/{big}/result",
                 f"/api/v1/jobs/{big}/stream", f"/api/v1/datasets/{big}", f"/api/v1/models/m/versions/{big}",
                 f"/api/v1/models/m/versions/{big}/files/weights"):
        assert_standard_error(api.get(path), 404)
    assert_standard_error(api.post(f"/api/v1/jobs/{big}/cancel"), 404)
    for path in (f"/jobs/{big}", f"/jobs/{big}/result", f"/ui/api/jobs/{big}", f"/ui/api/jobs/{big}/events",
                 f"/datasets/{big}"):
        assert_standard_error(api.client.get(path), 404)
    assert job_count(app) == 0


def test_the_largest_id_is_an_ordinary_not_found(api: ApiClient) -> None:
    err = assert_standard_error(api.get(f"/api/v1/jobs/{MAX_ID}"), 404)
    assert err["code"] == "not_found"


@pytest.mark.parametrize("path", ["/api/v1/jobs?cursor={n}", "/api/v1/datasets?cursor={n}",
                                  "/api/v1/jobs/1/events?after={n}"])
def test_query_integers_past_the_columns_are_422_naming_the_field(api: ApiClient, path: str) -> None:
    api.submit("sleep", {"seconds": 0, "steps": 1})  # job 1 exists: the events route validates its query
    field = path.rsplit("?", 1)[1].split("=")[0]
    for n in (MAX_ID + 1, 2**63, -(2**63)):
        err = assert_standard_error(api.get(path.format(n=n)), 422)
        assert field in err["details"]["query"], err


def test_stream_position_past_the_columns_is_400(api: ApiClient) -> None:
    job = api.submit("sleep", {"seconds": 0, "steps": 1})
    assert_standard_error(api.get(f"/api/v1/jobs/{job['id']}/stream?after={2**63}"), 400)
    assert_standard_error(api.get(f"/api/v1/jobs/{job['id']}/stream", headers={"Last-Event-ID": str(2**40)}), 400)


def test_body_versions_past_the_columns_are_422_naming_the_field(api: ApiClient, app) -> None:  # noqa: ANN001
    err = assert_standard_error(api.post("/api/v1/models/m/predict", json={"inputs": ["C"], "version": 2**31}), 422)
    assert "version" in err["details"]["json"], err
    err = assert_standard_error(api.put("/api/v1/models/m/aliases/prod", json={"version": 2**63}), 422)
    assert "version" in err["details"]["json"], err
    assert job_count(app) == 0


def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("body", [
    deep(5000),
    '{"kind": "sleep", "spec": {"a": ' + deep(5000) + "}}",
    '{"kind": "sleep", "spec": {"a": ' + "{\"b\": " * 5000 + "1" + "}" * 5000 + "}}",
    '{"kind": "sleep", "spec": {"a": ' + deep(MAX_JSON_DEPTH) + "}}",  # past the limit by the outer levels
])
def test_deeply_nested_json_is_400(api: ApiClient, app, body: str) -> None:  # noqa: ANN001
    r = api.post("/api/v1/jobs", data=body, headers={"Content-Type": "application/json"})
    err = assert_standard_error(r, 400)
    assert "nested too deeply" in err["message"]
    r = api.post("/api/v1/models/m/predict", data=body, headers={"Content-Type": "application/json"})
    assert_standard_error(r, 400)
    assert job_count(app) == 0


def test_nesting_within_the_limit_and_brackets_in_strings_are_fine(api: ApiClient) -> None:
    spec = {"seconds": 0, "steps": 1, "note": "[" * 5000}
    r = api.post("/api/v1/jobs", json={"kind": "sleep", "spec": spec})
    assert r.status_code in (202, 422), r.get_json()  # whatever the kind says of `note`, not a depth error
    assert "nested" not in r.get_data(as_text=True)
    assert json_depth('{"a": "[[[[", "b": 1}', limit=1) == 1  # brackets inside strings do not count
    assert json_depth('{"a": "\\"[[[[", "b": 1}', limit=1) == 1  # nor after an escaped quote
    assert json_depth('{"a": "[[[[", "b": [1]}', limit=1) == 2  # past the limit: counting stops
    assert json_depth(deep(MAX_JSON_DEPTH)) <= MAX_JSON_DEPTH


def test_a_number_too_long_to_parse_is_400(api: ApiClient, app) -> None:  # noqa: ANN001
    body = '{"kind": "sleep", "spec": {}, "priority": ' + "9" * 5000 + "}"
    err = assert_standard_error(api.post("/api/v1/jobs", data=body, headers={"Content-Type": "application/json"}),
                                400)
    assert "Malformed JSON" in err["message"]
    assert job_count(app) == 0


def web_session(app, client) -> None:  # noqa: ANN001
    tid, _key = create_tenant_key(app)
    with app.extensions["medmaas.db"].session() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tid))
    sign_in(app, client, key_id)


@pytest.mark.parametrize("priority", ["101", "-101", str(2**31), str(-(2**63)), "9" * 30])
def test_web_form_priority_out_of_range_is_400_with_the_field_error(app, client, priority: str) -> None:  # noqa: ANN001
    web_session(app, client)
    form = {"csrf_token": "token", "kind": "sleep", "spec": '{"seconds": 0, "steps": 2}', "priority": priority}
    r = client.post("/jobs/new", data=form)
    assert r.status_code == 400, r.get_data(as_text=True)[:500]
    page = r.get_data(as_text=True)
    assert "less than or equal to 100" in page and "priority" in page
    assert job_count(app) == 0


def test_web_form_with_a_deeply_nested_spec_is_400(app, client) -> None:  # noqa: ANN001
    web_session(app, client)
    form = {"csrf_token": "token", "kind": "sleep", "spec": '{"a": ' + deep(5000) + "}", "priority": "0"}
    r = client.post("/jobs/new", data=form)
    assert r.status_code == 400, r.get_data(as_text=True)[:500]
    assert job_count(app) == 0


# -- score CSVs ----------------------------------------------------------------------------

HOSTILE_IDS = ["=1+1", "=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "\ry", "plain", "a=b"]


def hostile_part(tmp_path):  # noqa: ANN001, ANN201
    cols = ("y",)
    schema = tbl.table_schema(cols)
    n = len(HOSTILE_IDS)
    scores = np.asarray([-1.5] * n, dtype=np.float32).reshape(n, 1)
    batch = tbl.build_batch(schema, cols, list(range(n)), HOSTILE_IDS, ["C"] * n, ["C"] * n, scores, [None] * n)
    w = tbl.PartWriter(tmp_path / "part-0.parquet", schema)
    w.write(batch)
    return w.close(), schema, n


def expected_csv_ids() -> list[str]:
    return [f"'{i}" if i[0] in "=+-@\t\r" else i for i in HOSTILE_IDS]


def test_merged_csv_escapes_formulas_and_parquet_keeps_raw_values(tmp_path) -> None:  # noqa: ANN001
    path, schema, n = hostile_part(tmp_path)
    counts = tbl.merge([(path, 0, n)], schema, tmp_path / "s.parquet", tmp_path / "s.csv", tbl.TopK(3, "y"))
    assert counts == {"rows": n, "valid": n}
    assert pq.read_table(tmp_path / "s.parquet").column("id").to_pylist() == HOSTILE_IDS
    csv = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert csv["id"].tolist() == expected_csv_ids()
    assert csv["id"][0] == "'=1+1"
    assert csv["y"].tolist() == [-1.5] * n  # a negative score is a number, not text
    assert csv["row"].tolist() == list(range(n))


def test_streamed_csv_escapes_formulas(tmp_path) -> None:  # noqa: ANN001
    path, schema, n = hostile_part(tmp_path)
    tbl.merge([(path, 0, n)], schema, tmp_path / "s.parquet", None, tbl.TopK(1, "y"))
    text = b"".join(csv_from_parquet(tmp_path / "s.parquet", chunk_rows=4)).decode()
    csv = pd.read_csv(io.StringIO(text), keep_default_na=False)
    assert csv["id"].tolist() == expected_csv_ids()
    assert csv["y"].tolist() == [-1.5] * n
    assert pq.read_table(tmp_path / "s.parquet").column("id").to_pylist() == HOSTILE_IDS
