"""The OpenAPI document tells the truth: every error response carries the real error body,
each operation lists the statuses it answers (no catch-all `default`), the job submit body
has each kind's spec; and the answers the fuzz test (tests/integration/test_fuzz.py) found
wrong stay fixed (405 with Allow, 404 for ids no route takes, JSON types as documented)."""
from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from app.kinds import submittable_kinds
from tests.conftest import ApiClient


@pytest.fixture()
def doc(client) -> dict[str, Any]:  # noqa: ANN001
    return client.get("/api/v1/openapi.json").get_json()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, ops in doc["paths"].items() for m, op in ops.items() if isinstance(op, dict)
            and "responses" in op]


def validate(doc: dict[str, Any], body: Any) -> None:
    """`body` against ErrorBody, its references resolved inside the document."""
    schema = {"$ref": "#/components/schemas/ErrorBody", "components": doc["components"]}
    jsonschema.validate(body, schema)


def test_error_responses_describe_the_real_error_body(doc) -> None:  # noqa: ANN001
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert detail["properties"]["code"]["type"] == "string"
    assert detail["properties"]["message"]["type"] == "string"
    assert set(detail["required"]) == {"code", "message", "details"}
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    assert "Error" not in doc["components"]["schemas"]  # flask-smorest's {code: int, status, errors}
    responses = doc["components"]["responses"]
    for method, path, op in operations(doc):
        assert "default" not in op["responses"], (method, path)
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            if "$ref" in response:
                response = responses[response["$ref"].rsplit("/", 1)[-1]]
            content = response["content"]["application/json"]["schema"]
            assert content == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)


def test_each_operation_lists_the_statuses_it_can_answer(doc, app) -> None:  # noqa: ANN001
    ops = operations(doc)
    assert len(ops) >= 20
    for method, path, op in ops:
        statuses = set(op["responses"])
        assert {"400", "401", "429"} <= statuses, (method, path)
        if "{" in path:
            assert "404" in statuses, (method, path)
        if method in ("POST", "PUT", "PATCH"):
            assert {"400", "413", "403"} <= statuses, (method, path)
        if "requestBody" in op:
            assert "422" in statuses, (method, path)
        if method == "DELETE":
            assert "409" in statuses, (method, path)
    by_key = {(m, p): set(op["responses"]) for m, p, op in ops}
    assert "403" not in by_key[("GET", "/api/v1/jobs")]  # any key may read
    assert {"403"} <= by_key[("GET", "/api/v1/keys")]  # admin only
    assert {"400", "409", "410"} <= by_key[("GET", "/api/v1/jobs/{job_id}/result")]
    assert "409" in by_key[("POST", "/api/v1/jobs/{job_id}/cancel")]
    assert "409" in by_key[("POST", "/api/v1/keys/{key_id}/rotate")]


def test_the_submit_body_has_every_kinds_spec(doc) -> None:  # noqa: ANN001
    body = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    variants = {v["properties"]["kind"]["enum"][0]: v for v in body["oneOf"]}
    assert set(variants) == set(submittable_kinds()) >= {"train", "score", "sleep"}
    for name, kind in submittable_kinds().items():
        ref = variants[name]["properties"]["spec"]["$ref"].rsplit("/", 1)[-1]
        documented = doc["components"]["schemas"][ref]["properties"]
        assert set(documented) == {f.data_key or n for n, f in kind.schema().fields.items()}, name
    assert variants["train"]["required"] == ["kind", "spec"] and variants["sleep"]["required"] == ["kind"]
    assert body["discriminator"] == {"propertyName": "kind"}
    upload = doc["paths"]["/api/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"kind", "file"} <= set(upload["required"]) and "name" in upload["properties"]


def test_real_errors_match_the_documented_body(doc, client, api: ApiClient) -> None:  # noqa: ANN001
    answers = [
        client.get("/api/v1/jobs"),  # 401
        api.get("/api/v1/jobs/999999"),  # 404
        api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"steps": 0}}),  # 422
        api.post("/api/v1/jobs", data="{", headers={"Content-Type": "application/json"}),  # 400
        api.put("/api/v1/jobs"),  # 405
        api.get("/api/v1/jobs/1/result?format=xlsx"),  # 404 (no such job)
    ]
    assert [r.status_code for r in answers] == [401, 404, 422, 400, 405, 404]
    for r in answers:
        validate(doc, r.get_json())


def test_405_names_the_allowed_methods_and_urls_no_rule_takes_are_404(api: ApiClient) -> None:
    r = api.client.open("/api/v1/jobs", method="TRACE", headers=api.headers)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    # werkzeug matches a rule's methods before its converters: DELETE /jobs/0 used to be a 405
    for method in ("DELETE", "GET", "POST"):
        r = api.client.open("/api/v1/jobs/0", method=method, headers=api.headers)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found", method


@pytest.mark.parametrize(("body", "field"), [
    ({"kind": "sleep", "priority": "5"}, "priority"),
    ({"kind": "sleep", "priority": True}, "priority"),
    ({"kind": "sleep", "max_attempts": 2.0}, "max_attempts"),
    ({"kind": "sleep", "spec": {"steps": "3"}}, "steps"),
    ({"kind": "sleep", "spec": {"seconds": "0.5"}}, "seconds"),
    ({"kind": "sleep", "spec": {"fail": 1}}, "fail"),
])
def test_json_bodies_take_the_documented_types(api: ApiClient, body: dict, field: str) -> None:
    r = api.post("/api/v1/jobs", json=body)
    assert r.status_code == 422 and field in str(r.get_json()["error"]["details"]), r.get_json()
    assert api.post("/api/v1/jobs", json={"kind": "sleep", "priority": 5, "spec": {"steps": 3, "seconds": 0,
                                                                                    "fail": False}}).status_code == 202


def test_text_with_a_nul_character_is_refused_as_documented(doc, api: ApiClient) -> None:  # noqa: ANN001
    """PostgreSQL cannot store NUL: every string in the document says so (a pattern), and the
    API refuses it on any database (here SQLite, which would store it): a path with one names
    nothing (404), a query or JSON field with one is invalid (422)."""
    key_create = doc["components"]["schemas"]["KeyCreate"]["properties"]["name"]
    path_name = doc["paths"]["/api/v1/models/{name}"]["parameters"][0]["schema"]
    assert key_create["pattern"] == path_name["pattern"] == "^[^\\u0000]*$"
    before = len(api.get("/api/v1/jobs?all=true").get_json()["items"])
    for r, status in ((api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"queue": "cpu\u0000"}}), 422),
                      (api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"k\u0000": 1}}), 422),
                      (api.get("/api/v1/jobs?kind=sl%00eep"), 422),
                      (api.get("/api/v1/models/m%00x"), 404)):
        assert r.status_code == status, r.get_json()
        validate(doc, r.get_json())
    assert api.get("/api/v1/jobs?kind=sl%00eep").get_json()["error"]["details"] == {
        "query": {"kind": ["Text in the request contains a NUL character (\\u0000), which is not allowed"]}}
    assert len(api.get("/api/v1/jobs?all=true").get_json()["items"]) == before


def test_an_upload_form_part_without_a_parsable_name_is_422(api: ApiClient) -> None:
    """Found by the fuzz test: a part named `"*\\"` (the closing quote escaped) has no name once
    parsed; sorting the option names then raised TypeError (a 500)."""
    b = "XyZ"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="*\\"\r\n\r\nx\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="kind"\r\n\r\nimages\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\nabc\r\n--{b}--\r\n')
    r = api.post("/api/v1/datasets", data=body.encode(), headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    assert r.status_code == 422 and r.get_json()["error"]["message"] == "every option needs a name"
