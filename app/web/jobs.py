"""Job pages: list (live), detail (live progress, ETA, metric curves, events), cancel, delete,
result download, and submit forms (any kind, train, score).

Queries, spec validation and submission are the jobs store's (app.stores.jobs), the
serialisers and the SSE generator the API's (app.api.jobs); only authentication differs
(session cookie instead of Bearer).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from flask import Response, abort, flash, g, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from marshmallow import missing
from sqlalchemy import select

from app.api import celery, database, db_session, settings, tenant_id
from app.api.jobs import EventListSchema, JobSchema, event_stream_response
from app.errors import ApiError, as_api_error
from app.jobs import IdempotencyKeyReused
from app.kinds import SpecError, all_kinds, get_kind, submittable_kinds
from app.models import TERMINAL_STATES, ApiKey, Job, JobState, KeyRole
from app.stores import Conflict
from app.stores import datasets as datasets_store
from app.stores import jobs as jobs_store
from app.stores import models as models_store
from app.stores.lifecycle import list_filters
from app.web import trust
from app.web.blueprint import bp
from app.web.filters import percent

PAGE_SIZE = 50
PRIORITY_MIN, PRIORITY_MAX = -100, 100
STATES = jobs_store.STATES


# -- helpers -----------------------------------------------------------------------------


def model_ref(job: Job) -> dict[str, Any]:
    """The model a job trains or uses. Train specs name it `model_name` (their `model` is a
    dict of hyper-parameters); score/predict specs reference `name`, `name@version` or
    `name@alias` in `model`, and their check adds the resolved `model_name` and `version`."""
    spec, result = job.spec or {}, job.result or {}
    reference = spec.get("model") if isinstance(spec.get("model"), str) else None
    name = spec.get("model_name") if isinstance(spec.get("model_name"), str) else None
    if name is None and reference:
        name = reference.split("@", 1)[0]
    if name is None and isinstance(result.get("model"), str):
        name = result["model"]
    version = next(
        (v for v in (spec.get("version"), result.get("version")) if isinstance(v, int) and not isinstance(v, bool)),
        None,
    )
    return {"label": reference or name, "name": name, "version": version}


def progress_label(state: JobState, progress: float | None) -> str:
    """What the bar's label says: the percentage while it runs, the outcome once it ended."""
    if state == JobState.succeeded:
        return "100%"
    if state in (JobState.failed, JobState.cancelled):
        return f"{state.value} at {percent(progress)}"
    return percent(progress)


def first_line(text: str | None) -> str | None:
    lines = (text or "").strip().splitlines()
    return lines[0].strip() if lines else None


def dump_job(job: Job) -> dict[str, Any]:
    data = JobSchema().dump(job)
    ref = model_ref(job)
    data.update(
        progress_label=progress_label(job.state, job.progress),
        error_line=first_line(job.error),
        model_name=ref["label"],
        model_registry_name=ref["name"],
        model_version=ref["version"],
        url=url_for("web.job_detail", job_id=job.id),
        result_url=url_for("web.job_result", job_id=job.id) if job.state == JobState.succeeded else None,
        model_url=url_for("web.model_detail", name=ref["name"]) if ref["name"] else None,
        terminal=job.state in TERMINAL_STATES,
    )
    return data


def _list_args() -> tuple[dict[str, Any], str | None]:
    args: dict[str, Any] = {}
    problem = None
    state = request.args.get("state") or ""
    if state:
        if state in STATES:
            args["state"] = state
        else:
            problem = f"Unknown state {state!r}"
    kind = (request.args.get("kind") or "").strip()
    if kind:
        args["kind"] = kind[:32]
    cursor = request.args.get("cursor") or ""
    if cursor:
        if cursor.isdigit():
            args["cursor"] = int(cursor)
        else:
            problem = "cursor must be a job id"
    filters, bad = list_filters(request.args)  # tag, model, search (app/stores/lifecycle.py)
    args.update(filters)
    problem = bad or problem
    return args, problem


def query_jobs(args: dict[str, Any], limit: int = PAGE_SIZE) -> tuple[list[Job], int | None]:
    """GET /api/v1/jobs's page (the jobs store's): newest first, filtered, keyset-paged by id."""
    page = jobs_store.list_page(
        db_session(),
        tenant_id(),
        state=args.get("state"),
        kind=args.get("kind"),
        limit=limit,
        cursor=args.get("cursor"),
        tag=args.get("tag"),
        model=args.get("model"),
        search=args.get("search"),
    )
    return page["items"], page["next_cursor"]


def kind_names() -> list[str]:
    return sorted(set(all_kinds()) | set(jobs_store.kinds_used(db_session(), tenant_id())))


def spec_fields(kind: Any) -> list[dict[str, Any]]:
    """The kind's spec schema as rows for the form's help table."""
    rows = []
    for name, field in kind.schema().fields.items():
        default = field.load_default
        if callable(default):
            default = default()
        rows.append(
            {
                "name": name,
                "type": type(field).__name__,
                "required": field.required,
                "default": None if default is missing else default,
                "description": (field.metadata or {}).get("description", ""),
            }
        )
    return rows


def default_spec(kind: Any) -> dict[str, Any]:
    """The kind's defaults (schema load_default values) for the spec editor."""
    out: dict[str, Any] = {}
    for row in spec_fields(kind):
        if row["default"] is not None:
            out[row["name"]] = row["default"]
        elif row["required"]:
            out[row["name"]] = None
    return out


def field_errors(exc: ApiError) -> dict[str, Any]:
    details = exc.details if isinstance(exc.details, dict) else {}
    spec = details.get("spec")
    return spec if isinstance(spec, dict) else {}


def _submit_from_form(kind: str, spec: dict[str, Any], priority: int = 0) -> Job:
    # One idempotency key per rendered form: a double click or a resubmitted POST gives one job.
    token = (request.form.get("form_id") or "")[:64]
    key = f"web-form-{token}" if token else None

    def submit(idempotency_key: str | None) -> tuple[Job, bool]:
        return jobs_store.submit(
            db_session(), celery(), database(), settings(), tenant_id(), kind, spec,
            priority=priority, idempotency_key=idempotency_key,
        )  # fmt: skip

    try:
        job, created = submit(key)
    except IdempotencyKeyReused:
        # The same form, sent back changed (browser Back, edit, submit): a new job, as a person expects.
        job, created = submit(f"web-form-{uuid.uuid4().hex}")
    flash(f"Job #{job.id} submitted." if created else f"Job #{job.id} was already submitted from this form.", "info")
    return job


# -- pages -------------------------------------------------------------------------------


@bp.get("/")
def index() -> ResponseReturnValue:
    return redirect(url_for("web.jobs"))


@bp.get("/jobs")
def jobs() -> ResponseReturnValue:
    args, problem = _list_args()
    if problem:
        flash(problem, "error")
    items, next_cursor = query_jobs(args)
    return render_template(
        "jobs.html",
        jobs=[dump_job(j) for j in items],
        next_cursor=next_cursor,
        filters=args,
        states=STATES,
        kinds=kind_names(),
        counts=jobs_store.state_counts(db_session(), tenant_id(), kind=args.get("kind")),
    )


@bp.get("/jobs/<id:job_id>")
def job_detail(job_id: int) -> ResponseReturnValue:
    job = jobs_store.get(db_session(), tenant_id(), job_id)
    top = trust.top_table(job.result) if job.kind == "score" and job.state == JobState.succeeded else None
    explained = job.kind == "predict" and bool((job.spec or {}).get("explain"))
    search = search_view(job) if job.kind == "search" else None
    return render_template("job.html", job=dump_job(job), top=top, explained=explained, search=search)


def search_view(job: Job) -> dict[str, Any]:
    """A search's trials (app/kinds/search.py trials_table) and, once it ended, the parameter
    importance its result carries."""
    from app.kinds.search import trials_table

    view = trials_table(db_session(), job.id, job.spec or {})
    view["importance"] = (job.result or {}).get("importance")
    return view


@bp.get("/jobs/<id:job_id>/cancel")
def job_cancel_confirm(job_id: int) -> ResponseReturnValue:
    """The confirmation step without JavaScript (the job page's script asks in a dialog)."""
    job = jobs_store.get(db_session(), tenant_id(), job_id)
    return render_template("job_cancel.html", job=dump_job(job))


@bp.post("/jobs/<id:job_id>/cancel")
def job_cancel(job_id: int) -> ResponseReturnValue:
    try:
        job, state = jobs_store.request_cancel(db_session(), tenant_id(), job_id)
    except Conflict:
        job = jobs_store.get(db_session(), tenant_id(), job_id)
        flash(f"Job #{job.id} already {job.state.value}.", "error")
    else:
        flash(
            f"Job #{job.id} cancelled."
            if state == JobState.cancelled
            else f"Cancel requested: job #{job.id} stops at its next checkpoint.",
            "info",
        )
    return redirect(url_for("web.job_detail", job_id=job_id))


@bp.get("/jobs/<id:job_id>/result")
def job_result(job_id: int) -> ResponseReturnValue:
    """The result download (what GET /api/v1/jobs/<id>/result serves, as an attachment)."""
    job = jobs_store.succeeded(db_session(), tenant_id(), job_id)
    kind = get_kind(job.kind)
    if kind is not None and kind.render_result is not None:
        return kind.render_result(job, request.args, settings())
    body = json.dumps(job.result or {}, indent=2, sort_keys=True, default=str)
    return Response(
        body,
        mimetype="application/json",
        headers={"Content-Disposition": f'attachment; filename="job-{job.id}-result.json"'},
    )


@bp.route("/jobs/new", methods=["GET", "POST"])
def job_new() -> ResponseReturnValue:
    kinds = submittable_kinds()
    kind_name = request.values.get("kind") or ("sleep" if "sleep" in kinds else next(iter(kinds), ""))
    kind = kinds.get(kind_name)
    defaults = {name: json.dumps(default_spec(k), indent=2) for name, k in kinds.items()}
    form = {"kind": kind_name, "spec": defaults.get(kind_name, "{}"), "priority": "0", "form_id": uuid.uuid4().hex}
    error: str | None = None
    errors: dict[str, Any] = {}
    status = 200
    if request.method == "POST":
        form.update({k: request.form.get(k, form[k]) for k in ("spec", "priority", "form_id")})
        try:
            spec = json.loads(form["spec"] or "{}")
            if not isinstance(spec, dict):
                raise ValueError("the spec must be a JSON object")
            priority = int(form["priority"] or 0)
        except ValueError as exc:
            error, status = f"Could not read the form: {exc}", 400
        else:
            if not PRIORITY_MIN <= priority <= PRIORITY_MAX:  # the API's range (JobSubmitSchema)
                rule = f"Must be greater than or equal to {PRIORITY_MIN} and less than or equal to {PRIORITY_MAX}."
                error, errors, status = "Could not read the form: priority out of range", {"priority": [rule]}, 400
            else:
                try:
                    job = _submit_from_form(kind_name, spec, priority)
                    return redirect(url_for("web.job_detail", job_id=job.id))
                except SpecError as exc:
                    err = as_api_error(exc)
                    error, errors, status = err.message, field_errors(err) or (err.details or {}), err.status
    return render_template(
        "job_new.html",
        kinds=kinds,
        kind=kind,
        form=form,
        defaults=defaults,
        error=error,
        errors=errors,
        fields=spec_fields(kind) if kind else [],
    ), status


@bp.route("/train/new", methods=["GET", "POST"])
def train_new() -> ResponseReturnValue:
    defaults = {
        "model_name": "",
        "dataset_id": request.args.get("dataset_id", ""),
        "arch": "rnn",
        "task": "regression",
        "target": "",
        "epochs": "10",
        "batch_size": "64",
        "lr": "0.001",
        "seed": "0",
        "device": "auto",
        "model": "{}",
        "early_stopping_patience": "",
        "split_method": "random",
        "val_fraction": "0.1",
        "test_fraction": "0.1",
        "form_id": uuid.uuid4().hex,
    }
    form = dict(defaults)
    error: str | None = None
    errors: dict[str, Any] = {}
    status = 200
    if request.method == "POST":
        form.update({k: (request.form.get(k) or "").strip() for k in defaults})
        spec, errors = _train_spec(form)
        if errors:
            error, status = "Please fix the marked fields.", 400
        else:
            try:
                job = _submit_from_form("train", spec)
                return redirect(url_for("web.job_detail", job_id=job.id))
            except SpecError as exc:
                err = as_api_error(exc)
                error, errors, status = err.message, _split_field_errors(field_errors(err)), err.status
    datasets = datasets_store.of_kinds(db_session(), tenant_id(), kinds=("sequences", "images"))
    return render_template(
        "train_new.html",
        form=form,
        error=error,
        errors=errors,
        datasets=datasets,
        available="train" in submittable_kinds(),
    ), status


def _number(
    form: dict[str, str], name: str, cast: type, errors: dict[str, Any], spec: dict[str, Any], required: bool = True
) -> None:
    raw = form.get(name, "")
    if raw == "":
        if required:
            errors[name] = ["Required."]
        return
    try:
        spec[name] = cast(raw)
    except ValueError:
        errors[name] = [f"Not a valid {'integer' if cast is int else 'number'}."]


def _train_spec(form: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec: dict[str, Any] = {
        "model_name": form["model_name"],
        "arch": form["arch"],
        "task": form["task"],
        "device": form["device"] or "auto",
    }
    errors: dict[str, Any] = {}
    if not form["model_name"]:
        errors["model_name"] = ["Required."]
    _number(form, "dataset_id", int, errors, spec)
    for name, cast in (("epochs", int), ("batch_size", int), ("lr", float), ("seed", int)):
        _number(form, name, cast, errors, spec)
    _number(form, "early_stopping_patience", int, errors, spec, required=False)
    targets = [t.strip() for t in form["target"].split(",") if t.strip()]
    if targets:
        spec["target"] = targets[0] if len(targets) == 1 else targets
    try:
        model = json.loads(form["model"] or "{}")
        if not isinstance(model, dict):
            raise ValueError
        spec["model"] = model
    except ValueError:
        errors["model"] = ['Architecture parameters must be a JSON object, e.g. {"hidden_size": 128}.']
    _split_spec(form, errors, spec)
    return spec, errors


# The train spec's `split` as form fields; its messages are the spec schema's (as the API's).
SPLIT_FIELDS = {"method": "split_method", "val": "val_fraction", "test": "test_fraction"}


def _split_spec(form: dict[str, str], errors: dict[str, Any], spec: dict[str, Any]) -> None:
    """split = {method, val, test}: the spec fills in train (the rest), and its range and sum
    checks (with the API's messages) run at submit."""
    split: dict[str, Any] = {"method": form["split_method"] or "random"}
    for key in ("val", "test"):
        _number(form, SPLIT_FIELDS[key], float, errors, split)
        if SPLIT_FIELDS[key] in split:
            split[key] = split.pop(SPLIT_FIELDS[key])
    spec["split"] = split


def _split_field_errors(errors: dict[str, Any]) -> dict[str, Any]:
    """{"split": {"val": [...]}} from the spec check -> the form's val_fraction field, etc.;
    what belongs to no one field (train, the sum) stays under "split"."""
    split = errors.get("split")
    if not isinstance(split, dict):
        return errors
    out = {k: v for k, v in errors.items() if k != "split"}
    rest = {}
    for key, messages in split.items():
        if key in SPLIT_FIELDS:
            out[SPLIT_FIELDS[key]] = messages
        else:
            rest[key] = messages
    if rest:  # e.g. train: "val 0.6 + test 0.5 leaves nothing for training"
        out["split"] = [
            m for messages in rest.values() for m in (messages if isinstance(messages, list) else [messages])
        ]
    return out


@bp.route("/score/new", methods=["GET", "POST"])
def score_new() -> ResponseReturnValue:
    defaults = {
        "model": request.args.get("model", ""),
        "library_id": request.args.get("library_id", ""),
        "top_k": "100",
        "explain_top_k": "10",
        "coverage": "0.9",
        "output": "csv",
        "form_id": uuid.uuid4().hex,
    }
    form = dict(defaults)
    error: str | None = None
    errors: dict[str, Any] = {}
    status = 200
    if request.method == "POST":
        form.update({k: (request.form.get(k) or "").strip() for k in defaults})
        spec: dict[str, Any] = {"model": form["model"], "output": form["output"] or "csv"}
        if not form["model"]:
            errors["model"] = ["Required."]
        _number(form, "library_id", int, errors, spec)
        _number(form, "top_k", int, errors, spec, required=False)
        _number(form, "explain_top_k", int, errors, spec, required=False)
        if isinstance(spec.get("explain_top_k"), int) and isinstance(spec.get("top_k"), int):
            spec["explain_top_k"] = min(spec["explain_top_k"], spec["top_k"])  # "draw the best n of the top k"
        _number(form, "coverage", float, errors, spec, required=False)
        if errors:
            error, status = "Please fix the marked fields.", 400
        else:
            try:
                job = _submit_from_form("score", spec)
                return redirect(url_for("web.job_detail", job_id=job.id))
            except SpecError as exc:
                err = as_api_error(exc)
                error, errors, status = err.message, field_errors(err), err.status
    return render_template(
        "score_new.html",
        form=form,
        error=error,
        errors=errors,
        libraries=datasets_store.of_kinds(db_session(), tenant_id(), kinds=("library",)),
        models=models_store.references(db_session(), tenant_id()),
        available="score" in submittable_kinds(),
    ), status


# -- session-authenticated JSON / SSE twins of the API (GET only) ------------------------


@bp.get("/ui/api/jobs")
def ui_jobs() -> ResponseReturnValue:
    args, problem = _list_args()
    if problem:
        raise ApiError(422, problem, "validation_error")
    try:
        limit = min(max(int(request.args.get("limit", PAGE_SIZE)), 1), 500)
    except ValueError:
        raise ApiError(422, "limit must be an integer", "validation_error") from None
    items, next_cursor = query_jobs(args, limit)
    return jsonify(
        items=[dump_job(j) for j in items],
        next_cursor=next_cursor,
        counts=jobs_store.state_counts(db_session(), tenant_id(), kind=args.get("kind")),
    )


@bp.get("/ui/api/jobs/<id:job_id>")
def ui_job(job_id: int) -> ResponseReturnValue:
    return jsonify(dump_job(jobs_store.get(db_session(), tenant_id(), job_id)))


@bp.get("/ui/api/jobs/<id:job_id>/events")
def ui_job_events(job_id: int) -> ResponseReturnValue:
    try:
        after = max(int(request.args.get("after", 0)), 0)
        limit = min(max(int(request.args.get("limit", 1000)), 1), 10_000)
    except ValueError:
        jobs_store.get(db_session(), tenant_id(), job_id)  # another tenant's job: 404 before 422
        raise ApiError(422, "after and limit must be integers", "validation_error") from None
    return jsonify(EventListSchema().dump(jobs_store.events_after(db_session(), tenant_id(), job_id, after, limit)))


@bp.get("/ui/api/jobs/<id:job_id>/stream")
def ui_job_stream(job_id: int) -> ResponseReturnValue:
    job = jobs_store.get(db_session(), tenant_id(), job_id)
    return event_stream_response(job.id)


# -- erasure: a confirmation page, then a CSRF-checked POST (member role) -----------------


def key_role() -> KeyRole:
    """The signed-in key's role (as the API's `requires` checks it)."""
    role = g.get("web_key_role")
    if role is None:
        role = db_session().scalar(select(ApiKey.role).where(ApiKey.id == g.api_key_id))
    return KeyRole(role)


def may_delete() -> bool:
    """Whether the signed-in key may delete (the API's DELETE routes need member)."""
    return key_role().allows(KeyRole.member)


def require_delete_role() -> None:
    if not may_delete():
        abort(403, f"Deleting needs a member or admin key; you signed in with a {key_role().value} key.")


@bp.app_context_processor
def _erasure_globals() -> dict[str, Any]:
    return {"may_delete": may_delete}


USED_BY = "Queued or running jobs use it; wait for them to finish or cancel them, then delete it:"


def confirm_delete_page(
    *,
    heading: str,
    summary: str,
    consequence: str,
    action: str,
    back: str,
    back_label: str,
    blocking: list[int],
    blocked_text: str = USED_BY,
) -> ResponseReturnValue:
    """The confirmation step; while jobs block the deletion it names them instead."""
    return render_template(
        "confirm_delete.html",
        blocked_text=blocked_text,
        heading=heading,
        summary=summary,
        consequence=consequence,
        action=action,
        back=back,
        back_label=back_label,
        blocking=[{"id": i, "url": url_for("web.job_detail", job_id=i)} for i in blocking],
    )


@bp.get("/jobs/<id:job_id>/delete")
def job_delete_confirm(job_id: int) -> ResponseReturnValue:
    require_delete_role()
    job = dump_job(jobs_store.get(db_session(), tenant_id(), job_id))
    return confirm_delete_page(
        heading=f"Delete job #{job_id}?",
        summary=f"{job['kind']} · {job['state']}" + (f" · {job['model_name']}" if job["model_name"] else ""),
        consequence="Its events, result, checkpoints and score files are erased; a model version it trained stays.",
        action=url_for("web.job_delete", job_id=job_id),
        back=job["url"],
        back_label=f"Back to job #{job_id}",
        blocking=[] if job["terminal"] else [job_id],
        blocked_text=f"This job is {job['state']}; cancel it first, then delete it:",
    )


@bp.post("/jobs/<id:job_id>/delete")
def job_delete(job_id: int) -> ResponseReturnValue:
    require_delete_role()
    try:
        jobs_store.delete(db_session(), settings(), tenant_id(), job_id)
    except Conflict as exc:
        flash(exc.message, "error")
        return redirect(url_for("web.job_detail", job_id=job_id))
    flash(f"Job #{job_id} deleted.", "info")
    return redirect(url_for("web.jobs"))
