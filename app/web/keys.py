"""The key management page (admin keys only): the tenant's API keys with their role, use and
expiry; create a key (its secret is shown once, in the answer to that POST), revoke one
(after a confirmation page), rotate one. The rules are app.auth's, as for the API and CLI:
the tenant's last active admin key is refused with a clear message, a revoked key cannot be
rotated, and revoking or rotating a key ends the browser sessions signed in with it."""

from __future__ import annotations

from typing import Any

from flask import abort, flash, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from marshmallow import ValidationError

from app import auth
from app.api import db_session, tenant_id
from app.api.keys import KeyCreateSchema
from app.models import ApiKey, KeyRole
from app.web.blueprint import bp

ROLE_HELP = {
    KeyRole.viewer: "read only",
    KeyRole.member: "submit jobs, upload, predict, read",
    KeyRole.admin: "everything, including keys, aliases, deletion and the audit trail",
}


def _admin_only() -> None:
    if g.get("web_key_role") != KeyRole.admin:
        abort(
            403,
            f"Managing API keys needs an admin key; this sign-in's key has the {KeyRole(g.web_key_role).value} role.",
        )


def _key(key_id: int) -> ApiKey:
    key = auth.tenant_key(db_session(), tenant_id(), key_id)
    if key is None:
        abort(404)
    return key


def status(key: ApiKey) -> str:
    return {"API key revoked": "revoked", "API key expired": "expired"}.get(auth.refusal(key) or "", "active")


def _page(status_code: int = 200, **context: Any) -> ResponseReturnValue:
    keys = auth.tenant_keys(db_session(), tenant_id())
    form = context.pop("form", {"name": "", "role": KeyRole.member.value, "expires_in_days": ""})
    return render_template(
        "keys.html",
        keys=keys,
        status=status,
        roles=list(KeyRole),
        role_help=ROLE_HELP,
        form=form,
        signed_in_key_id=g.api_key_id,
        **context,
    ), status_code


def _confirm(action: str, key: ApiKey, error: str | None = None, status_code: int = 200) -> ResponseReturnValue:
    return render_template(
        "key_confirm.html", action=action, key=key, status=status(key), own=key.id == g.api_key_id, error=error
    ), status_code


@bp.get("/keys")
def keys_page() -> ResponseReturnValue:
    _admin_only()
    return _page()


@bp.post("/keys")
def key_create() -> ResponseReturnValue:
    _admin_only()
    form = {name: request.form.get(name, "").strip() for name in ("name", "role", "expires_in_days")}
    raw: dict[str, Any] = {"name": form["name"], "role": form["role"]}
    errors: dict[str, list[str]] = {}
    if form["expires_in_days"]:
        try:
            raw["expires_in_days"] = int(form["expires_in_days"])
        except ValueError:
            errors["expires_in_days"] = ["Not a valid integer."]
    try:
        body = KeyCreateSchema().load(raw)  # the API's own rules for a new key
    except ValidationError as exc:
        errors.update({k: list(v) for k, v in exc.normalized_messages().items()})
    if errors:
        return _page(400, form=form, errors=errors, error="The key was not created.")
    key, secret = auth.new_key(db_session(), tenant_id(), body["name"], KeyRole(body["role"]), body["expires_in_days"])
    db_session().commit()
    return _page(201, created=key, secret=secret)


@bp.route("/keys/<id:key_id>/revoke", methods=["GET", "POST"])
def key_revoke(key_id: int) -> ResponseReturnValue:
    _admin_only()
    key = _key(key_id)
    own = key.id == g.api_key_id
    if request.method == "GET":
        return _confirm("revoke", key)
    try:
        auth.revoke(db_session(), key)
    except auth.LastAdminKey:
        db_session().rollback()
        message = (
            f"Key {key.prefix} is the tenant's last active admin key: without it nobody could manage "
            "keys. Create another admin key first, or rotate this one to replace its secret."
        )
        return _confirm("revoke", key, error=message, status_code=409)
    db_session().commit()
    if own:  # this browser signed in with it: its session has just ended
        flash(f"Key {key.prefix} revoked; it was this sign-in's key, so you are signed out.", "info")
        return redirect(url_for("web.login"))
    flash(f"Key {key.prefix} ({key.name or 'unnamed'}) revoked.", "info")
    return redirect(url_for("web.keys_page"))


@bp.route("/keys/<id:key_id>/rotate", methods=["GET", "POST"])
def key_rotate(key_id: int) -> ResponseReturnValue:
    _admin_only()
    old = _key(key_id)
    if request.method == "GET":
        return _confirm("rotate", old)
    try:
        new, secret = auth.rotate(db_session(), old)
    except auth.KeyAlreadyRevoked:
        return _page(409, error=f"Key {old.prefix} is revoked; create a new key instead.")
    db_session().commit()
    return _page(201, created=new, secret=secret, rotated=old, own=old.id == g.api_key_id)
