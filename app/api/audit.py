"""/api/v1/audit: the tenant's audit trail (admin): filtered pages, a JSON-lines export and
a check of the hash chain."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC
from typing import Any

from flask import Response
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from app import audit
from app.api import MAX_ID, database, db_session, requires, tenant_id
from app.api.auditing import flush_reads
from app.models import KeyRole, Tenant
from app.stores import audit as audit_store

blp = Blueprint("audit", __name__, url_prefix="/api/v1/audit", description="The tenant's audit trail (admin)")

MAX_EVENT_ID = 2**63 - 1
NDJSON = "application/x-ndjson"


NO_NUL = validate.Regexp(r"^[^\x00]*$", error="must not contain NUL characters")


class AuditFilterArgs(Schema):
    action = fields.String(
        validate=[validate.Length(max=64), NO_NUL],
        metadata={"description": "an action (model.predict), or a prefix ending in '.' (model.)"},
    )
    object_type = fields.String(validate=[validate.Length(max=32), NO_NUL])
    object_id = fields.String(validate=[validate.Length(max=255), NO_NUL])
    key_id = fields.Integer(validate=validate.Range(min=1, max=MAX_ID))
    outcome = fields.String(validate=validate.OneOf([o.value for o in audit.Outcome]))
    since = fields.AwareDateTime(default_timezone=UTC, metadata={"description": "from this time (inclusive)"})
    until = fields.AwareDateTime(default_timezone=UTC, metadata={"description": "before this time"})


class AuditListArgs(AuditFilterArgs):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.Integer(
        validate=validate.Range(min=0, max=MAX_EVENT_ID), metadata={"description": "rows with id below this"}
    )


class AuditEventSchema(Schema):
    id = fields.Integer()
    seq = fields.Integer(allow_none=True, metadata={"description": "null until the row is sealed into the chain"})
    ts = fields.DateTime()
    actor = fields.String(metadata={"description": "key, cli or system"})
    via = fields.String(metadata={"description": "api, web, cli or system"})
    key_id = fields.Integer(allow_none=True)
    key_prefix = fields.String(allow_none=True)
    action = fields.String()
    object_type = fields.String(allow_none=True)
    object_id = fields.String(allow_none=True)
    outcome = fields.String(metadata={"description": "ok, unchanged, denied or failed"})
    status = fields.Integer(allow_none=True, metadata={"description": "HTTP status, when known at writing"})
    client_addr = fields.String(allow_none=True)
    request_id = fields.String(allow_none=True)
    details = fields.Dict()
    prev_hash = fields.String(allow_none=True)
    hash = fields.String(allow_none=True)


class AuditListSchema(Schema):
    items = fields.List(fields.Nested(AuditEventSchema))
    next_cursor = fields.Integer(allow_none=True)


class ChainSchema(Schema):
    intact = fields.Boolean()
    rows = fields.Integer()
    last_seq = fields.Integer()
    broken_seq = fields.Integer(allow_none=True)
    problem = fields.String(allow_none=True)


@blp.route("", methods=["GET"])
@blp.arguments(AuditListArgs, location="query")
@blp.response(200, AuditListSchema)
@requires(KeyRole.admin)
def list_events(args: dict[str, Any]) -> dict[str, Any]:
    """The tenant's audit rows, newest first; page with next_cursor."""
    flush_reads()
    return audit_store.list_page(
        db_session(), tenant_id(), audit_store.AuditFilter.of(args), args["limit"], args.get("cursor")
    )


@blp.route("/export", methods=["GET"])
@blp.arguments(AuditFilterArgs, location="query")
@blp.doc(
    responses={
        200: {
            "description": "JSON lines (application/x-ndjson): one row per line in chain order, hashes included",
            "content": {NDJSON: {"schema": {"type": "string"}}},
        }
    }
)
@requires(KeyRole.admin)
def export(args: dict[str, Any]) -> Response:
    """The tenant's audit rows as JSON lines, oldest first (streamed)."""
    return export_response(tenant_id(), audit_store.AuditFilter.of(args))


def export_response(tenant: int, filters: audit_store.AuditFilter) -> Response:
    """A streamed JSON-lines download of the tenant's matching rows (the API's and the page's)."""
    flush_reads()
    db = database()

    def lines() -> Iterator[str]:
        with db.sessionmaker() as session:
            yield from audit.export_lines(audit_store.in_order(session, tenant, filters))

    return Response(
        lines(), mimetype=NDJSON, headers={"Content-Disposition": f'attachment; filename="audit-tenant-{tenant}.jsonl"'}
    )


@blp.route("/verify", methods=["GET"])
@blp.response(200, ChainSchema)
@requires(KeyRole.admin)
def verify() -> dict[str, Any]:
    """Walk the tenant's hash chain; names the first row edited or deleted by hand."""
    flush_reads()
    session = db_session()
    report = audit.verify_tenant(session, session.get_one(Tenant, tenant_id()))
    return {**vars(report), "intact": report.intact}
