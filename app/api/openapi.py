"""The OpenAPI document tells the truth about errors: every error response has the real body
({"error": {"code", "message", "details"}}, app.errors.ErrorBodySchema), and each operation
lists the statuses it can answer with instead of a catch-all `default`.

Most statuses follow from what an operation is (the rules in `_statuses`); a view adds the
rest with `@answers(409, ...)`. Schemathesis (tests/integration/test_fuzz.py) checks every
answer of a live server against this document.

It is valid OpenAPI 3.0 (openapi-spec-validator, tests/unit/test_openapi.py) so other tools can
consume it: form fields and files become one multipart/form-data body (no Swagger 2 formData
parameters), each operation has an operationId (`<blueprint>_<view>`), and every job kind's
spec schema is a component (app.api.jobs.submit_body_doc). A standard generator
(openapi-python-client) builds a working client from it (tests/integration/test_generated_client.py)."""

from __future__ import annotations

import copy
import http
from collections.abc import Callable
from typing import Any, TypeVar

from apispec import APISpec, BasePlugin
from apispec.ext.marshmallow import MarshmallowPlugin, OpenAPIConverter
from flask import Flask

from app.errors import NO_NUL_PATTERN
from app.models import KeyRole

F = TypeVar("F", bound=Callable[..., Any])
# Where OpenAPI 3 parameters may be; anything else (apispec's formData) belongs in the body.
PARAMETER_LOCATIONS = frozenset({"path", "query", "header", "cookie"})
MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
FORM_CONTENT_TYPES = frozenset({MULTIPART, URLENCODED})
_SCHEMA_REF = "#/components/schemas/"
_ANSWERS_ATTR = "_medmaas_error_statuses"
_BODY_ATTR = "_medmaas_body_doc"
BodyDoc = Callable[[APISpec], dict[str, Any]]
BODY_METHODS = frozenset({"post", "put", "patch"})


def answers(*statuses: int) -> Callable[[F], F]:
    """Declare error statuses a view answers with beyond those its shape implies (e.g. 409)."""

    def decorate(view: F) -> F:
        setattr(view, _ANSWERS_ATTR, frozenset(statuses) | getattr(view, _ANSWERS_ATTR, frozenset()))
        return view

    return decorate


def body_doc(build: BodyDoc, content_type: str = "application/json") -> Callable[[F], F]:
    """Document a view's request body with the schema `build(spec)` returns, in place of the
    one derived from its arguments schema (e.g. one variant per job kind)."""

    def decorate(view: F) -> F:
        setattr(view, _BODY_ATTR, (build, content_type))
        return view

    return decorate


def camel_case(name: str) -> str:
    """`onnx_export` -> `OnnxExport` (a kind's name in a component's name)."""
    return "".join(part[:1].upper() + part[1:] for part in name.replace("-", "_").split("_"))


def component_ref(spec: APISpec, name: str, schema: dict[str, Any]) -> str:
    """Register `schema` as components/schemas/`name` (once per document) and return its $ref."""
    if name not in spec.components.schemas:
        spec.components.schema(name, component=schema)
    return _SCHEMA_REF + name


def _declared(view: Callable[..., Any] | None, attr: str) -> Any:
    while view is not None:
        if hasattr(view, attr):
            return getattr(view, attr)
        view = getattr(view, "__wrapped__", None)
    return None


def schema_converter(spec: APISpec) -> OpenAPIConverter:
    """apispec's marshmallow converter of this spec (fields and schemas to OpenAPI)."""
    plugin = next(p for p in spec.plugins if isinstance(p, MarshmallowPlugin))
    assert plugin.converter is not None  # set by init_spec
    return plugin.converter


def declared_answers(view: Callable[..., Any] | None) -> frozenset[int]:
    found: frozenset[int] = frozenset()
    while view is not None:
        found |= getattr(view, _ANSWERS_ATTR, frozenset())
        view = getattr(view, "__wrapped__", None)
    return found


def response_name(status: int) -> str:
    """The name flask-smorest registers each status's error response under (its schema is the
    Api's ERROR_SCHEMA)."""
    return http.HTTPStatus(status).name


def _statuses(method: str, operation: dict[str, Any], has_path_args: bool, role: KeyRole) -> set[int]:
    # every /api/v1 operation needs a key, and any text in a request may be unusable (a NUL)
    statuses = {400, 401}
    if role != KeyRole.viewer:
        statuses.add(403)  # a key of a lesser role
    if has_path_args:
        statuses.add(404)  # no such object, or another tenant's
    has_query = any(p.get("in") == "query" for p in operation.get("parameters", []) if isinstance(p, dict))
    if method in BODY_METHODS:
        statuses |= {400, 413}  # malformed or too deeply nested JSON, over the size cap
    if "requestBody" in operation or has_query:
        statuses |= {400, 422}  # fields that do not validate
    if method == "delete":
        statuses.add(409)  # still in use
    return statuses


def _described(parameter: dict[str, Any]) -> dict[str, Any]:
    return {"description": parameter["description"]} if "description" in parameter else {}


def _is_file(prop: dict[str, Any]) -> bool:
    return prop.get("format") == "binary" or (prop.get("type") == "array" and _is_file(prop.get("items", {})))


def _no_nul_pattern(_converter: Any, _field: Any, ret: dict[str, Any], **_kw: Any) -> dict[str, Any]:
    """A string property without a pattern, enum or format gets the no-NUL pattern."""
    if ret.get("type") == "string" and not {"pattern", "enum", "format"} & ret.keys():
        return {"pattern": NO_NUL_PATTERN}
    return {}


def install(api: Any, app: Flask) -> None:
    """Add the error statuses and bodies, the per-view body documents and the no-NUL pattern
    to the Api's OpenAPI document (call before registering blueprints)."""
    plugin = ErrorResponsesPlugin(app)
    plugin.init_spec(api.spec)
    api.spec.plugins.append(plugin)
    schema_converter(api.spec).add_attribute_function(_no_nul_pattern)


class ErrorResponsesPlugin(BasePlugin):
    def __init__(self, app: Flask) -> None:
        self.app = app

    def init_spec(self, spec: APISpec) -> None:
        super().init_spec(spec)
        self.spec = spec

    def _error_content(self) -> dict[str, Any]:
        from app.errors import ErrorBodySchema

        return {"application/json": {"schema": schema_converter(self.spec).resolve_nested_schema(ErrorBodySchema)}}

    def _inline(self, schema: dict[str, Any]) -> dict[str, Any]:
        """A copy of an object schema with a component reference resolved (one level)."""
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith(_SCHEMA_REF):
            schema = self.spec.components.schemas[ref[len(_SCHEMA_REF) :]]
        return copy.deepcopy(schema)

    def _fold_form_parameters(self, operation: dict[str, Any], documented: bool) -> None:
        """OpenAPI 3 has no `in: formData` parameters (Swagger 2 had): flask-smorest makes the
        first body-like arguments of a view the requestBody and apispec turns the others (a
        `form` schema next to a `files` one) into formData parameters. Fold those into the
        body's object schema, multipart/form-data where there is a file, else urlencoded;
        drop them where a `body_doc` already documents the whole body."""
        parameters = operation.get("parameters")
        if not isinstance(parameters, list):
            return
        # (a {"$ref": ...} to a components/parameters entry has no `in` and stays)
        form = [p for p in parameters if isinstance(p, dict) and p.get("in", "path") not in PARAMETER_LOCATIONS]
        if not form:
            return
        operation["parameters"] = [p for p in parameters if p not in form]
        if not operation["parameters"]:
            del operation["parameters"]
        if documented:
            return
        properties = {p["name"]: {**p.get("schema", {}), **_described(p)} for p in form}
        required = [p["name"] for p in form if p.get("required")]
        body = operation.setdefault("requestBody", {"required": bool(required), "content": {}})
        content = body["content"]
        files = any(_is_file(prop) for prop in properties.values())
        if not content:
            content[MULTIPART if files else URLENCODED] = {"schema": {"type": "object", "properties": {}}}
        for content_type in list(content):
            schema = self._inline(content[content_type].get("schema", {"type": "object"}))
            schema.setdefault("type", "object")
            schema.setdefault("properties", {}).update(properties)
            # parts read by several schemas: what one of them would refuse another may take
            # (the form's extra fields, files beyond those named), so the body is not closed
            schema.pop("additionalProperties", None)
            schema["required"] = sorted(set(schema.get("required", [])) | set(required))
            if not schema["required"]:
                del schema["required"]
            media = content.pop(content_type)
            media["schema"] = schema
            # form fields next to files are one multipart body
            content[MULTIPART if files and content_type in FORM_CONTENT_TYPES else content_type] = media

    def path_helper(
        self,
        path: str | None = None,
        operations: dict | None = None,
        parameters: list[dict] | None = None,
        **kwargs: Any,
    ) -> str | None:
        for parameter in parameters or []:
            schema = parameter.get("schema") if isinstance(parameter, dict) else None
            if isinstance(schema, dict) and schema.get("type") == "string" and "pattern" not in schema:
                schema["pattern"] = NO_NUL_PATTERN
        return None  # the path itself stays as it is

    def operation_helper(self, path: str | None = None, operations: dict | None = None, **kwargs: Any) -> None:
        from app.api import required_role

        rule = kwargs.get("rule")
        view = self.app.view_functions.get(rule.endpoint) if rule is not None else None
        methods = [m for m, op in (operations or {}).items() if isinstance(op, dict)]
        for method, operation in (operations or {}).items():
            if not isinstance(operation, dict):
                continue
            if rule is not None:
                # unique (endpoints are), stable names for generated clients: jobs_submit, datasets_upload
                suffix = f"_{method}" if len(methods) > 1 else ""
                operation.setdefault("operationId", rule.endpoint.replace(".", "_") + suffix)
            declared = _declared(view, _BODY_ATTR)
            if declared is not None:
                build, content_type = declared
                operation["requestBody"]["content"] = {content_type: {"schema": build(self.spec)}}
            self._fold_form_parameters(operation, documented=declared is not None)
            responses = operation.setdefault("responses", {})
            for code, response in responses.items():
                # an error documented inline (a description only) still has the error body
                if str(code).isdigit() and int(code) >= 400 and isinstance(response, dict):
                    response.setdefault("content", self._error_content())
            present = {str(code) for code in responses}
            wanted = _statuses(method, operation, bool(rule is not None and rule.arguments), required_role(view))
            for status in sorted(wanted | declared_answers(view)):
                if str(status) not in present:
                    responses[str(status)] = response_name(status)
