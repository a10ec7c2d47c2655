"""The OpenAPI document tells the truth: every error response carries the real error body,
each operation lists the statuses it answers (no catch-all `default`), the job submit body
has each kind's spec; and the answers the fuzz test (tests/integration/test_fuzz.py) found
wrong stay fixed (405 with Allow, 404 for ids no route takes, JSON types as documented)."""

from __future__ import annotations

from typing import Any

import jsonschema
import openapi_spec_validator
import pytest
from flask import Flask
from flask_smorest import Blueprint
from marshmallow import RAISE, Schema, fields
from marshmallow.validate import Range
from openapi_spec_validator import OpenAPIV30SpecValidator

from app.api import MedmaasApi, requires
from app.api.openapi import install
from app.kinds import KINDS, KindSpec, all_kinds, submittable_kinds
from app.models import KeyRole
from tests.conftest import ApiClient, _make_app, close_app


@pytest.fixture
def doc(client) -> dict[str, Any]:
    return client.get("/api/v1/openapi.json").get_json()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (m.upper(), p, op)
        for p, ops in doc["paths"].items()
        for m, op in ops.items()
        if isinstance(op, dict) and "responses" in op
    ]


def validate(doc: dict[str, Any], body: Any) -> None:
    """`body` against ErrorBody, its references resolved inside the document."""
    schema = {"$ref": "#/components/schemas/ErrorBody", "components": doc["components"]}
    jsonschema.validate(body, schema)


def test_error_responses_describe_the_real_error_body(doc) -> None:
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


def test_each_operation_lists_the_statuses_it_can_answer(doc, app) -> None:
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


def test_the_document_is_valid_openapi_3_0(doc) -> None:
    """What other tools consume: openapi-spec-validator finds nothing (it used to find the
    upload's Swagger 2 `in: formData` parameters), and every parameter is one OpenAPI 3 has."""
    assert doc["openapi"].startswith("3.0.")
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in OpenAPIV30SpecValidator(doc).iter_errors()
    ]
    assert errors == []
    openapi_spec_validator.validate(doc)  # the validator's own choice of version agrees
    for method, path, op in operations(doc):
        for parameter in op.get("parameters", []) + doc["paths"][path].get("parameters", []):
            assert parameter["in"] in ("path", "query", "header", "cookie"), (method, path, parameter)
    ids = [op["operationId"] for _m, _p, op in operations(doc)]
    assert len(ids) == len(set(ids))
    assert "jobs_submit" in ids
    assert "datasets_upload" in ids


def test_the_submit_body_has_every_kinds_spec(doc) -> None:
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    mapping = body["discriminator"]["mapping"]
    assert body["discriminator"]["propertyName"] == "kind"
    assert [v["$ref"] for v in body["oneOf"]] == list(mapping.values())
    assert set(mapping) == set(submittable_kinds()) >= {"train", "score", "sleep", "predict", "pretrain"}
    variants = {name: schemas[ref.rsplit("/", 1)[-1]] for name, ref in mapping.items()}
    assert mapping["train"] == "#/components/schemas/TrainJobSubmit"
    for name, kind in submittable_kinds().items():
        assert variants[name]["properties"]["kind"] == {"type": "string", "enum": [name]}
        ref = variants[name]["properties"]["spec"]["$ref"].rsplit("/", 1)[-1]
        assert schemas[ref] is schemas[spec_schema_name(doc, kind.schema)]
    assert variants["train"]["required"] == ["kind", "spec"]
    assert variants["sleep"]["required"] == ["kind"]
    # every kind's spec is published, those only the platform enqueues (ingest) too
    for name, kind in all_kinds().items():
        documented = schemas[spec_schema_name(doc, kind.schema)]["properties"]
        assert set(documented) == {f.data_key or n for n, f in kind.schema().fields.items() if not f.dump_only}, name
    assert {"TrainSpec", "ScoreSpec", "PredictSpec", "SleepSpec", "IngestSpec", "PretrainSpec"} <= set(schemas)
    assert schemas["TrainSpec"]["properties"]["arch"]["enum"] == ["cnn", "rnn"]
    upload = doc["paths"]["/api/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"kind", "file"} <= set(upload["required"])
    assert "name" in upload["properties"]
    assert upload["properties"]["file"] == {"type": "string", "format": "binary"}


def spec_schema_name(doc: dict[str, Any], schema: type[Schema]) -> str:
    """The component a kind's marshmallow schema is published as (apispec's name: TrainSpec)."""
    name = schema.__name__.removesuffix("Schema")
    assert name in doc["components"]["schemas"], name
    return name


def test_a_kind_registered_later_appears_in_the_document(sqlite_settings, monkeypatch) -> None:
    class ProbeSpec(Schema):
        class Meta:
            unknown = RAISE

        depth = fields.Integer(required=True, validate=Range(min=1))

    monkeypatch.setitem(KINDS, "zz_probe", KindSpec("zz_probe", ProbeSpec, lambda spec, settings: "cpu", "a probe"))
    monkeypatch.setitem(
        KINDS, "zz_internal", KindSpec("zz_internal", ProbeSpec, lambda spec, settings: "cpu", submittable=False)
    )
    app = _make_app(sqlite_settings)
    try:
        doc = app.test_client().get("/api/v1/openapi.json").get_json()
    finally:
        close_app(app)
    OpenAPIV30SpecValidator(doc).validate()
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["mapping"]["zz_probe"] == "#/components/schemas/ZzProbeJobSubmit"
    assert "zz_internal" not in body["discriminator"]["mapping"]
    assert schemas["ZzProbeJobSubmit"]["properties"]["spec"] == {"$ref": "#/components/schemas/ProbeSpec"}
    assert schemas["ProbeSpec"]["properties"]["depth"] == {"type": "integer", "minimum": 1}
    assert schemas["ProbeSpec"]["required"] == ["depth"]


def test_form_and_file_arguments_become_one_multipart_body() -> None:
    """Any route reading form fields and files (two arguments decorators, no body_doc) gets
    one multipart/form-data body in OpenAPI 3 terms; form fields alone stay urlencoded."""
    app = Flask("probe")
    app.config.update(API_TITLE="probe", API_VERSION="1", OPENAPI_VERSION="3.0.3")
    api = MedmaasApi(app)
    install(api, app)
    blp = Blueprint("probe", "probe", url_prefix="/api/v1/probe")

    class Form(Schema):
        title = fields.String(required=True, metadata={"description": "what it is"})
        note = fields.String()

    class Files(Schema):
        attachment = fields.Raw(metadata={"type": "string", "format": "binary"}, required=True)

    @blp.route("/upload", methods=["POST"])
    @blp.arguments(Form, location="form")
    @blp.arguments(Files, location="files")
    @blp.response(201)
    @requires(KeyRole.member)
    def upload(form: dict[str, Any], files: dict[str, Any]) -> None:  # pragma: no cover - documented only
        return None

    @blp.route("/note", methods=["POST"])
    @blp.arguments(Form, location="form")
    @blp.response(201)
    @requires(KeyRole.member)
    def note(form: dict[str, Any]) -> None:  # pragma: no cover - documented only
        return None

    api.register_blueprint(blp)
    doc = api.spec.to_dict()
    OpenAPIV30SpecValidator(doc).validate()
    op = doc["paths"]["/api/v1/probe/upload"]["post"]
    assert "parameters" not in op
    assert op["requestBody"]["required"] is True
    body = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(body["properties"]) == {"title", "note", "attachment"}
    assert body["properties"]["title"]["description"] == "what it is"
    assert body["required"] == ["attachment", "title"]
    assert "additionalProperties" not in body
    note_body = doc["paths"]["/api/v1/probe/note"]["post"]["requestBody"]["content"]
    assert list(note_body) == ["application/x-www-form-urlencoded"]


def test_real_errors_match_the_documented_body(doc, client, api: ApiClient) -> None:
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
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    # werkzeug matches a rule's methods before its converters: DELETE /jobs/0 used to be a 405
    for method in ("DELETE", "GET", "POST"):
        r = api.client.open("/api/v1/jobs/0", method=method, headers=api.headers)
        assert r.status_code == 404, method
        assert r.get_json()["error"]["code"] == "not_found", method


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "sleep", "priority": "5"}, "priority"),
        ({"kind": "sleep", "priority": True}, "priority"),
        ({"kind": "sleep", "max_attempts": 2.0}, "max_attempts"),
        ({"kind": "sleep", "spec": {"steps": "3"}}, "steps"),
        ({"kind": "sleep", "spec": {"seconds": "0.5"}}, "seconds"),
        ({"kind": "sleep", "spec": {"fail": 1}}, "fail"),
    ],
)
def test_json_bodies_take_the_documented_types(api: ApiClient, body: dict, field: str) -> None:
    r = api.post("/api/v1/jobs", json=body)
    assert r.status_code == 422, r.get_json()
    assert field in str(r.get_json()["error"]["details"]), r.get_json()
    assert (
        api.post(
            "/api/v1/jobs", json={"kind": "sleep", "priority": 5, "spec": {"steps": 3, "seconds": 0, "fail": False}}
        ).status_code
        == 202
    )


def test_text_with_a_nul_character_is_refused_as_documented(doc, api: ApiClient) -> None:
    """PostgreSQL cannot store NUL: every string in the document says so (a pattern), and the
    API refuses it on any database (here SQLite, which would store it): a path with one names
    nothing (404), a query or JSON field with one is invalid (422)."""
    key_create = doc["components"]["schemas"]["KeyCreate"]["properties"]["name"]
    path_name = doc["paths"]["/api/v1/models/{name}"]["parameters"][0]["schema"]
    assert key_create["pattern"] == path_name["pattern"] == "^[^\\u0000]*$"
    before = len(api.get("/api/v1/jobs?all=true").get_json()["items"])
    for r, status in (
        (api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"queue": "cpu\u0000"}}), 422),
        (api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"k\u0000": 1}}), 422),
        (api.get("/api/v1/jobs?kind=sl%00eep"), 422),
        (api.get("/api/v1/models/m%00x"), 404),
    ):
        assert r.status_code == status, r.get_json()
        validate(doc, r.get_json())
    assert api.get("/api/v1/jobs?kind=sl%00eep").get_json()["error"]["details"] == {
        "query": {"kind": ["Text in the request contains a NUL character (\\u0000), which is not allowed"]}
    }
    assert len(api.get("/api/v1/jobs?all=true").get_json()["items"]) == before


def test_an_upload_form_part_without_a_parsable_name_is_422(api: ApiClient) -> None:
    """Found by the fuzz test: a part named `"*\\"` (the closing quote escaped) has no name once
    parsed; sorting the option names then raised TypeError (a 500)."""
    b = "XyZ"
    body = (
        f'--{b}\r\nContent-Disposition: form-data; name="*\\"\r\n\r\nx\r\n'
        f'--{b}\r\nContent-Disposition: form-data; name="kind"\r\n\r\nimages\r\n'
        f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\nabc\r\n--{b}--\r\n'
    )
    r = api.post("/api/v1/datasets", data=body.encode(), headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    assert r.status_code == 422
    assert r.get_json()["error"]["message"] == "every option needs a name"
