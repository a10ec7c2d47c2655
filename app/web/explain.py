"""Trust on the pages: "Explain a molecule / an image" from a model's page, the explanation
page of a predict job (prediction, spread, interval, domain flag, drawing), and the drawings
themselves.

The form submits the same `predict` job the API's POST /models/{name}/predict does (with
`explain: true`), waits briefly, then redirects to the job's explanation page, which a
browser without JavaScript can refresh (and reloads itself, by a <noscript> meta refresh,
while the job runs); with JavaScript it polls the job's JSON twin and reloads once done.

Drawings are never inlined into a page: the page shows <img src> of a session-authenticated
route here that serves the SVG (or PNG) the worker wrote into the job's result, or, for a
score job's top-K, the files listed in its result's `explanations` inside the job's
directory. An image the browser loads through <img> runs no script, and the files are sent
with the data Content-Security-Policy (app.security_headers), so the pages' CSP is unchanged.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from flask import Response, abort, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from app import artifacts
from app.api import celery, database, db_session, settings, tenant_id
from app.artifacts import job_dir, open_read
from app.errors import as_api_error, domain_errors
from app.models import TERMINAL_STATES, Job, JobState, KeyRole
from app.stores import jobs as jobs_store
from app.stores import models as models_store
from app.web import trust
from app.web.blueprint import bp
from app.web.jobs import dump_job, first_line, key_role
from app.web.library import _model_page, _parse_ref, explain_form_defaults

EXPLAIN_WAIT_S = 5.0  # the form waits this long for the job before showing its page
IMAGE_METHODS = ("gradcam", "ig")
UNCERTAINTY_CHOICES = ("auto", "mc_dropout", "none")
COVERAGE_RANGE = (0.5, 0.99)
MAX_DRAWING_BYTES = 4 << 20  # an RDKit SVG or heat-map PNG is a few hundred KB at most
METHOD_NAMES = {"integrated_gradients": "Integrated gradients", "grad_cam": "Grad-CAM", "ig": "Integrated gradients"}
PENDING_REFRESH_S = 3  # the <noscript> meta refresh of a page whose job still runs


def _explain_error(
    name: str, status: int, form: dict[str, str], message: str, **errors: list[str]
) -> ResponseReturnValue:
    return _model_page(name, status, explain_form=form, explain_error=message, explain_errors=errors)


def _coverage(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if COVERAGE_RANGE[0] <= value <= COVERAGE_RANGE[1] else None


def _image_input() -> tuple[dict[str, str] | None, str | None]:
    """(the predict input, None) for the uploaded image, or (None, what is wrong)."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        return None, "Choose an image file (PNG, JPEG or DICOM)."
    limit = settings().max_json_bytes * 3 // 4  # what the API's JSON body holds as base64
    raw = upload.read(limit + 1)
    if len(raw) > limit:
        return None, f"The image is larger than {limit // 1024} KB."
    return {"image_base64": base64.b64encode(raw).decode("ascii")}, None


@bp.post("/models/<string:name>/explain")
def model_explain(name: str) -> ResponseReturnValue:
    """Submit one input for an explained prediction (the API's predict with explain=true)."""
    form = explain_form_defaults()
    form.update({k: (request.form.get(k) or "").strip() for k in form if k in request.form})
    if not key_role().allows(KeyRole.member):  # as POST /api/v1/models/{name}/predict requires
        return _explain_error(name, 403, form, f"Predicting needs a member or admin key, not {key_role().value}.")
    version, alias = _parse_ref(form["ref"])
    try:
        mv = models_store.version(db_session(), tenant_id(), name, version, alias)
    except domain_errors() as exc:
        err = as_api_error(exc)
        return _explain_error(name, err.status, form, err.message)
    coverage = _coverage(form["coverage"])
    if coverage is None:
        lo, hi = COVERAGE_RANGE
        return _explain_error(name, 400, form, "Please fix the marked fields.", coverage=[f"Between {lo} and {hi}."])
    if form["uncertainty"] not in UNCERTAINTY_CHOICES:
        form["uncertainty"] = "auto"
    spec: dict[str, Any] = {
        "model": f"{mv.name}@{mv.version}",
        "explain": True,
        "coverage": coverage,
        "uncertainty": form["uncertainty"],
    }
    if form["sets"] and mv.task == "classification":
        spec["prediction_sets"] = True
    if mv.input_kind == "image":
        item, problem = _image_input()
        if item is None:
            return _explain_error(name, 400, form, "Please fix the marked fields.", file=[problem or ""])
        spec.update(inputs=[item], explain_format="png")
        spec["explain_method"] = form["method"] if form["method"] in IMAGE_METHODS else "gradcam"
    else:
        if not form["smiles"]:
            return _explain_error(name, 400, form, "Please fix the marked fields.", smiles=["Enter a SMILES."])
        spec.update(inputs=[form["smiles"]], explain_format="svg")
    token = (request.form.get("form_id") or "")[:64]
    try:
        job, _created = jobs_store.submit(
            db_session(), celery(), database(), settings(), tenant_id(), "predict", spec,
            idempotency_key=f"web-explain-{token}" if token else None,
        )  # fmt: skip
    except domain_errors() as exc:
        err = as_api_error(exc)
        return _explain_error(name, err.status, form, err.message)
    jobs_store.wait_finished(database(), current_app.extensions["medmaas.hub"], job.id, EXPLAIN_WAIT_S)
    return redirect(url_for("web.job_explanation", job_id=job.id), code=303)


def _predict_job(job_id: int) -> Job:
    job = jobs_store.get(db_session(), tenant_id(), job_id)
    if job.kind != "predict":
        abort(404, f"Job {job_id} is a {job.kind} job; only predict jobs have an explanation page.")
    return job


def _shown_inputs(job: Job) -> list[str]:
    inputs = (job.spec or {}).get("inputs") or []
    return [x if isinstance(x, str) else f"image {i + 1}" for i, x in enumerate(inputs)]


@bp.get("/jobs/<id:job_id>/explanation")
def job_explanation(job_id: int) -> ResponseReturnValue:
    """A predict job's predictions with their trust: spread, interval, domain, drawing."""
    job = _predict_job(job_id)
    shown = _shown_inputs(job)
    items: list[trust.ExplainedItem] = []
    if job.state == JobState.succeeded and isinstance(job.result, dict):
        predictions = job.result.get("predictions") or []
        items = [trust.explained_item(i, p, shown[i] if i < len(shown) else None) for i, p in enumerate(predictions)]
    data = dump_job(job)
    return render_template(
        "explanation.html",
        job=data,
        items=items,
        spec=job.spec or {},
        terminal=job.state in TERMINAL_STATES,
        error_line=first_line(job.error),
        refresh_s=PENDING_REFRESH_S,
        method_names=METHOD_NAMES,
    )


@bp.get("/jobs/<id:job_id>/drawings/<int:index>")
def job_drawing(job_id: int, index: int) -> ResponseReturnValue:
    """The drawing of a predict job's `index`-th input, from the job's own result."""
    job = jobs_store.succeeded(db_session(), tenant_id(), job_id)
    predictions = (job.result or {}).get("predictions") if job.kind == "predict" else None
    if not isinstance(predictions, list) or not 0 <= index < len(predictions):
        abort(404, f"Job {job_id} has no prediction {index}.")
    pred = predictions[index]
    output = request.args.get("output") or None
    found = trust.drawing_bytes(pred.get("explanation") if isinstance(pred, dict) else None, output)
    if found is None:
        abort(404, f"Prediction {index} of job {job_id} has no drawing.")
    body, media_type = found
    return Response(body, mimetype=media_type)


@bp.get("/jobs/<id:job_id>/files/<path:name>")
def job_file(job_id: int, name: str) -> ResponseReturnValue:
    """A drawing a score job's worker wrote into its directory and listed in its result."""
    job = jobs_store.succeeded(db_session(), tenant_id(), job_id)
    if name not in trust.explanation_files(job.result).names():
        abort(404, f"Job {job_id} has no file {name!r}.")
    root = job_dir(settings(), job.tenant_id, job.id).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not artifacts.is_file(path):
        abort(404, f"The file {name!r} of job {job_id} is no longer available.")
    body = _read_small(path)
    media_type = trust.MEDIA_TYPES[path.suffix.lower()]
    if media_type == "image/svg+xml" and not trust.is_svg(body.decode("utf-8", "replace")):
        abort(404, f"The file {name!r} of job {job_id} is not a drawing.")
    if media_type == "image/png" and not body.startswith(trust.PNG_MAGIC):
        abort(404, f"The file {name!r} of job {job_id} is not a drawing.")
    return Response(body, mimetype=media_type)


def _read_small(path: Path) -> bytes:
    with open_read(path) as fh:  # decrypts when the artifacts are encrypted at rest
        body = fh.read(MAX_DRAWING_BYTES + 1)
    if len(body) > MAX_DRAWING_BYTES:
        abort(404, "The drawing is too large to show.")
    return body
