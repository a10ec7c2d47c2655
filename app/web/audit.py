"""The audit page (admin keys only): the tenant's audit trail with filters and paging. Every
page request is itself recorded: `begin` attaches the request's entry once the session
guard has signed it in (this module's hook runs after the guard's)."""

from __future__ import annotations

from typing import Any

from flask import abort, g, render_template, request
from flask.typing import ResponseReturnValue
from marshmallow import EXCLUDE, ValidationError

from app import audit
from app.api import auditing, db_session, tenant_id
from app.api.audit import AuditFilterArgs, AuditListArgs, export_response
from app.models import ApiKey, KeyRole
from app.stores import audit as audit_store
from app.web import session_auth  # noqa: F401  (its sign-in guard must be registered before _begin_audit)
from app.web.blueprint import bp

PAGE_SIZE = 50


@bp.before_request
def _begin_audit() -> None:
    auditing.begin("web")


def signed_in_role() -> KeyRole | None:
    if g.get("web_key_role") is not None:  # set by the sign-in guard
        return KeyRole(g.web_key_role)
    key_id = g.get("api_key_id")
    key = db_session().get(ApiKey, key_id) if key_id is not None else None
    return key.role if key is not None else None


@bp.app_context_processor
def _audit_nav() -> dict[str, Any]:
    return {"show_audit_link": lambda: signed_in_role() == KeyRole.admin}


def _admin_only() -> None:
    if signed_in_role() != KeyRole.admin:
        abort(403, "The audit trail is for admin keys only.")


def _filter_args(schema: AuditFilterArgs) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """(parsed filters, the non-empty query fields as given, a problem to show or None)."""
    raw = {k: v for k, v in request.args.items() if v.strip()}
    try:
        return schema.load(raw), raw, None
    except ValidationError as exc:
        problem = "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in exc.normalized_messages().items())
        return {}, raw, problem


@bp.get("/audit")
def audit_page() -> ResponseReturnValue:
    _admin_only()
    args, raw, error = _filter_args(AuditListArgs(unknown=EXCLUDE))
    auditing.flush_reads()
    page = audit_store.list_page(
        db_session(), tenant_id(), audit_store.AuditFilter.of(args), PAGE_SIZE, args.get("cursor")
    )
    filters = {k: v for k, v in raw.items() if k != "cursor"}
    return render_template(
        "audit.html",
        events=page["items"],
        next_cursor=page["next_cursor"],
        filters=filters,
        cursor=args.get("cursor"),
        outcomes=[o.value for o in audit.Outcome],
        error=error,
    ), (422 if error else 200)


@bp.get("/audit/export")
def audit_export() -> ResponseReturnValue:
    """The filtered rows as JSON lines, oldest first (what GET /api/v1/audit/export serves)."""
    _admin_only()
    args, _raw, error = _filter_args(AuditFilterArgs(unknown=EXCLUDE))
    if error:
        abort(422, error)
    return export_response(tenant_id(), audit_store.AuditFilter.of(args))
