"""The OpenAPI document tells the truth about errors: every error response has the real body
({"error": {"code", "message", "details"}}, app.errors.ErrorBodySchema), and each operation
lists the statuses it can answer with instead of a catch-all `default`.

Most statuses follow from what an operation is (the rules in `_statuses`); a view adds the
rest with `@answers(409, ...)`. Schemathesis (tests/integration/test_fuzz.py) checks every
answer of a live server against this document."""

from __future__ import annotations

import http
from collections.abc import Callable
from typing import Any, TypeVar

from apispec import APISpec, BasePlugin
from apispec.ext.marshmallow import MarshmallowPlugin, OpenAPIConverter
from flask import Flask
from marshmallow import Schema

from app.errors import NO_NUL_PATTERN
from app.models import KeyRole

F = TypeVar("F", bound=Callable[..., Any])
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


def merged(*schemas: type[Schema]) -> BodyDoc:
    """One object with the fields of several schemas: a multipart body read by two arguments
    decorators (form fields and files), which flask-smorest documents only one of."""

    def build(spec: APISpec) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for schema in schemas:
            part = schema_converter(spec).schema2jsonschema(schema)
            out["properties"].update(part.get("properties", {}))
            out["required"] += part.get("required", [])
        return out

    return build


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
        for method, operation in (operations or {}).items():
            if not isinstance(operation, dict):
                continue
            declared = _declared(view, _BODY_ATTR)
            if declared is not None:
                build, content_type = declared
                operation["requestBody"]["content"] = {content_type: {"schema": build(self.spec)}}
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
