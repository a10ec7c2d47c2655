"""/api/v1/keys: the tenant's API keys (admin): list, create, revoke, rotate.

A secret is shown once, in the answer to create or rotate; only its hash is stored, and
listings never include it (or the hash)."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from app import auth
from app.api import db_session, requires, tenant_id
from app.api.openapi import answers
from app.errors import ApiError
from app.fields import StrictInteger
from app.models import ApiKey, KeyRole

blp = Blueprint("keys", __name__, url_prefix="/api/v1/keys", description="API keys of the tenant (admin)")

ROLES = [r.value for r in KeyRole]


class KeySchema(Schema):
    id = fields.Int()
    prefix = fields.Str()
    name = fields.Str()
    role = fields.Str()
    created_at = fields.DateTime()
    last_used_at = fields.DateTime(allow_none=True)
    expires_at = fields.DateTime(allow_none=True)
    revoked_at = fields.DateTime(allow_none=True)


class KeyListSchema(Schema):
    items = fields.List(fields.Nested(KeySchema))


class KeyCreateSchema(Schema):
    name = fields.Str(load_default="", validate=validate.Length(max=128))
    role = fields.Str(required=True, validate=validate.OneOf(ROLES))
    expires_in_days = StrictInteger(load_default=None, allow_none=True, validate=validate.Range(min=1, max=36500))


class KeySecretSchema(KeySchema):
    secret = fields.Str(metadata={"description": "the full key: shown only in this answer"})


def _get(key_id: int) -> ApiKey:
    key = auth.tenant_key(db_session(), tenant_id(), key_id)
    if key is None:
        raise ApiError(404, f"API key {key_id} not found", "not_found")
    return key


def _with_secret(key: ApiKey, secret: str) -> dict[str, Any]:
    return {**{name: getattr(key, name) for name in KeySchema().fields}, "secret": secret}


@blp.route("", methods=["GET"])
@blp.response(200, KeyListSchema)
@requires(KeyRole.admin)
def list_keys() -> dict[str, Any]:
    return {"items": auth.tenant_keys(db_session(), tenant_id())}


@blp.route("", methods=["POST"])
@blp.arguments(KeyCreateSchema)
@blp.response(201, KeySecretSchema)
@requires(KeyRole.admin)
def create(body: dict[str, Any]) -> dict[str, Any]:
    session = db_session()
    key, secret = auth.new_key(session, tenant_id(), body["name"], KeyRole(body["role"]), body["expires_in_days"])
    session.commit()
    return _with_secret(key, secret)


@blp.route("/<id:key_id>", methods=["DELETE"])
@blp.response(204)
@requires(KeyRole.admin)
def revoke(key_id: int) -> None:
    session = db_session()
    try:
        auth.revoke(session, _get(key_id))
    except auth.LastAdminKey as exc:
        raise ApiError(409, str(exc), "conflict") from None
    session.commit()


@blp.route("/<id:key_id>/rotate", methods=["POST"])
@answers(409)  # already revoked
@blp.response(201, KeySecretSchema)
@requires(KeyRole.admin)
def rotate(key_id: int) -> dict[str, Any]:
    session = db_session()
    try:
        key, secret = auth.rotate(session, _get(key_id))
    except auth.KeyAlreadyRevoked as exc:
        raise ApiError(409, str(exc), "conflict") from None
    session.commit()
    return _with_secret(key, secret)
