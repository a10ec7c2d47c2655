"""Lifecycle pages: compare runs (curves overlaid, spec diff, final metrics side by side),
"run again with changes" (a prefilled spec editor), tags on jobs and model versions, and
model cards on the model page (the `_card.html` partial) with their downloads and edit form.

Queries are app.stores.lifecycle's, app.stores.tags' and app.cards'; the pages' POSTs are
CSRF-checked and need a member key (app.web.session_auth's guard)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from flask import Response, flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from app import cards
from app.api import auditing, celery, database, db_session, settings, tenant_id
from app.errors import as_api_error
from app.jobs import IdempotencyKeyReused
from app.kinds import SpecError, get_kind
from app.models import KeyRole, ModelVersion
from app.stores import Invalid, lifecycle
from app.stores import jobs as jobs_store
from app.stores import tags as tags_store
from app.web.blueprint import bp
from app.web.jobs import PRIORITY_MAX, PRIORITY_MIN, dump_job, field_errors, key_role

_SPLIT = re.compile(r"[\s,]+")


def parse_tags(text: str) -> list[str]:
    """Split "a, b c" into ["a", "b", "c"] (the tag fields of the pages)."""
    return [t for t in _SPLIT.split(text or "") if t]


def may_edit() -> bool:
    """Whether the signed-in key may tag, clone and edit cards (the API's member routes)."""
    return key_role().allows(KeyRole.member)


def clonable(kind: str) -> bool:
    k = get_kind(kind)
    return k is not None and k.submittable


def version_cards(versions: list[ModelVersion]) -> list[dict[str, Any]]:
    """The model page's cards, newest version first (the partial _card.html)."""
    session = db_session()
    return [cards.build(session, mv) for mv in versions]


@bp.app_context_processor
def _lifecycle_globals() -> dict[str, Any]:
    return {
        "may_edit": may_edit,
        "clonable": clonable,
        "version_cards": version_cards,
        "card_text_fields": cards.TEXT_TITLES,
    }


# -- compare ---------------------------------------------------------------------------------


@bp.get("/jobs/compare")
def jobs_compare() -> ResponseReturnValue:
    """?ids=1&ids=2 (the jobs page's checkboxes) or ?ids=1,2,3; oldest run first."""
    ids = sorted(lifecycle.parse_ids(request.args.getlist("ids")))
    auditing.note(job_ids=ids)
    data = lifecycle.compare(db_session(), tenant_id(), ids)
    for job in data["jobs"]:
        job["url"] = url_for("web.job_detail", job_id=job["id"])
    return render_template("compare.html", data=data, ids=",".join(map(str, ids)))


@bp.get("/jobs/<id:job_id>/trials/compare")
def search_trials_compare(job_id: int) -> ResponseReturnValue:
    """A search's trials on the compare page (?slots=0,3 picks some; default every trial)."""
    data = lifecycle.compare_trials(
        db_session(), tenant_id(), job_id, lifecycle.parse_slots(request.args.getlist("slots"))
    )
    for item in data["jobs"]:
        item["url"] = url_for("web.job_detail", job_id=job_id) + "#search-trials"
    return render_template("compare.html", data=data, ids=None, search_id=job_id)


@bp.get("/ui/api/jobs/compare")
def ui_jobs_compare() -> ResponseReturnValue:
    """The session-authenticated twin of GET /api/v1/jobs/compare."""
    ids = lifecycle.parse_ids(request.args.getlist("ids"))
    auditing.note(job_ids=ids)
    return jsonify(lifecycle.compare(db_session(), tenant_id(), ids))


# -- clone -----------------------------------------------------------------------------------


@bp.route("/jobs/<id:job_id>/clone", methods=["GET", "POST"])
def job_clone(job_id: int) -> ResponseReturnValue:
    """The "run again with changes" page: the job's spec in an editor; submitting makes a new job
    whose cloned_from is this one."""
    source = jobs_store.get(db_session(), tenant_id(), job_id)
    kind = get_kind(source.kind)
    if kind is None or not kind.submittable:
        raise Invalid(f"Job {job_id} is a {source.kind} job; that kind cannot be submitted again", "not_clonable")
    spec = lifecycle.submittable_spec(kind, source.spec or {})
    form = {
        "spec": json.dumps(spec, indent=2, sort_keys=True),
        "priority": str(source.priority),
        "form_id": uuid.uuid4().hex,
    }
    error: str | None = None
    errors: dict[str, Any] = {}
    status = 200
    if request.method == "POST":
        form.update({k: request.form.get(k, form[k]) for k in form})
        try:
            edited = json.loads(form["spec"] or "{}")
            if not isinstance(edited, dict):
                raise ValueError("the spec must be a JSON object")
            priority = int(form["priority"] or 0)
            if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
                raise ValueError(f"priority must be {PRIORITY_MIN}..{PRIORITY_MAX}")
        except ValueError as exc:
            error, status = f"Could not read the form: {exc}", 400
        else:
            token = (form["form_id"] or "")[:64]
            try:
                try:
                    job, created = _clone(job_id, edited, priority, f"web-clone-{token}" if token else None)
                except IdempotencyKeyReused:  # the same form sent back changed: a new job
                    job, created = _clone(job_id, edited, priority, f"web-clone-{uuid.uuid4().hex}")
            except (SpecError, Invalid) as exc:
                err = as_api_error(exc)
                error, errors, status = err.message, field_errors(err) or (err.details or {}), err.status
            else:
                flash(
                    f"Job #{job.id} submitted (a copy of job #{job_id} with your changes)."
                    if created
                    else f"Job #{job.id} was already submitted from this form.",
                    "info",
                )
                return redirect(url_for("web.job_detail", job_id=job.id))
    changed = _changed_keys(spec, form["spec"])
    return render_template(
        "job_clone.html",
        source=dump_job(source),
        form=form,
        error=error,
        errors=errors,
        changed=changed,
    ), status


def _clone(job_id: int, spec: dict[str, Any], priority: int, key: str | None) -> Any:
    return lifecycle.clone(
        db_session(), celery(), database(), settings(), tenant_id(), job_id,
        spec=spec, priority=priority, idempotency_key=key,
    )  # fmt: skip


def _changed_keys(original: dict[str, Any], edited_text: str) -> list[str]:
    """The flattened keys an edited spec changes (shown next to the editor after a refusal)."""
    try:
        edited = json.loads(edited_text)
    except ValueError:
        return []
    if not isinstance(edited, dict):
        return []
    a, b = lifecycle.flatten(original), lifecycle.flatten(edited)
    return sorted(k for k in set(a) | set(b) if a.get(k, ...) != b.get(k, ...))


# -- tags ------------------------------------------------------------------------------------


@bp.post("/jobs/<id:job_id>/tags")
def job_tags(job_id: int) -> ResponseReturnValue:
    """Replace a job's tags with the form's `tags` (space- or comma-separated)."""
    try:
        job = tags_store.tag_job(db_session(), tenant_id(), job_id, replace=parse_tags(request.form.get("tags", "")))
    except Invalid as exc:
        db_session().rollback()
        flash(exc.message, "error")
    else:
        flash(f"Job #{job.id} tags: {', '.join(job.tags) or 'none'}.", "info")
    return redirect(url_for("web.job_detail", job_id=job_id) + "#tags")


@bp.post("/models/<string:name>/versions/<id:version>/tags")
def model_version_tags(name: str, version: int) -> ResponseReturnValue:
    try:
        mv = tags_store.tag_version(
            db_session(), tenant_id(), name, version, replace=parse_tags(request.form.get("tags", ""))
        )
    except Invalid as exc:
        db_session().rollback()
        flash(exc.message, "error")
    else:
        flash(f"{name} v{mv.version} tags: {', '.join(mv.tags) or 'none'}.", "info")
    return redirect(url_for("web.model_detail", name=name) + f"#card-v{version}")


# -- model cards -----------------------------------------------------------------------------


@bp.post("/models/<string:name>/versions/<id:version>/card")
def model_card_edit(name: str, version: int) -> ResponseReturnValue:
    """The card's written parts from the model page's form (empty clears one)."""
    changes = {k: request.form.get(k, "")[: cards.MAX_TEXT] for k in cards.TEXT_FIELDS if k in request.form}
    session = db_session()
    mv = tags_store.model_version(session, tenant_id(), name, version, lock=True)
    cards.edit(session, mv, changes)
    flash(f"Model card of {name} v{version} saved.", "info")
    return redirect(url_for("web.model_detail", name=name) + f"#card-v{version}")


@bp.get("/models/<string:name>/versions/<id:version>/card.md")
def model_card_markdown(name: str, version: int) -> ResponseReturnValue:
    mv = tags_store.model_version(db_session(), tenant_id(), name, version)
    return Response(
        cards.markdown(cards.build(db_session(), mv)),
        mimetype="text/markdown",
        headers={"Content-Disposition": f'attachment; filename="{name}-v{version}-card.md"'},
    )


@bp.get("/models/<string:name>/versions/<id:version>/card.json")
def model_card_json(name: str, version: int) -> ResponseReturnValue:
    from app.api.cards import CardSchema

    mv = tags_store.model_version(db_session(), tenant_id(), name, version)
    response = jsonify(CardSchema().dump(cards.build(db_session(), mv)))
    response.headers["Content-Disposition"] = f'attachment; filename="{name}-v{version}-card.json"'
    return response
