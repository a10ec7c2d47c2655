"""Dataset and model-registry pages: upload with validation report, versions with metrics,
aliases, weights download, deletion.

Uploads, look-ups and the registry rules (aliases, bundle files) are the stores'
(app.stores.datasets, app.stores.models), as for the API; only authentication (session
cookie + CSRF) and rendering differ. The stores' errors render as this page's form errors
(with the status and message app.errors gives the API), or as error pages.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from flask import abort, current_app, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from marshmallow import ValidationError

from app import dispatch
from app.api import celery, database, db_session, settings, tenant_id
from app.api.datasets import DatasetUploadForm
from app.artifacts import send_artifact
from app.errors import as_api_error, domain_errors
from app.kinds.predict import EXPLAINABLE_INPUTS, MAX_INPUTS
from app.models import DatasetStatus, JobState
from app.stores import Conflict, NotFound
from app.stores import datasets as datasets_store
from app.stores import jobs as jobs_store
from app.stores import models as models_store
from app.stores import onnx as onnx_store
from app.web import trust
from app.web.blueprint import bp
from app.web.jobs import confirm_delete_page, first_line, require_delete_role

DATASET_KINDS = ("sequences", "images", "library")


def _parse_options(text: str) -> tuple[dict[str, str], list[str]]:
    options, problems = {}, []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            problems.append(f"line {n}: expected key=value")
            continue
        options[key.strip()] = value.strip()
    return options, problems


# -- datasets ----------------------------------------------------------------------------


@bp.route("/datasets", methods=["GET", "POST"])
def datasets() -> ResponseReturnValue:
    form = {"kind": request.args.get("kind") or "sequences", "name": "", "options": "text_column=smiles"}
    error: str | None = None
    errors: dict[str, Any] = {}
    rejected: dict[str, Any] = {}
    status = 200
    if request.method == "POST":
        form = {k: (request.form.get(k) or "").strip() for k in ("kind", "name", "options")}
        options, problems = _parse_options(form["options"])
        upload = request.files.get("file")
        if problems:
            errors["options"] = problems
        if upload is None or not upload.filename:
            errors["file"] = ["Choose a file to upload."]
        fields = {"kind": form["kind"], **({"name": form["name"]} if form["name"] else {}), **options}
        try:
            loaded = DatasetUploadForm().load(fields)
        except ValidationError as exc:
            errors.update(exc.messages if isinstance(exc.messages, dict) else {"form": exc.messages})
        if errors or upload is None:
            error, status = "Please fix the marked fields.", 400
        else:
            try:
                ds = datasets_store.create_from_upload(
                    db_session(),
                    settings(),
                    tenant_id(),
                    kind=loaded["kind"],
                    name=loaded.get("name"),
                    stream=upload.stream,
                    filename=upload.filename or "upload",
                    options=datasets_store.upload_options(loaded),
                    publish=lambda items: dispatch.publish_jobs(celery(), database(), items, stamp=False),
                )
            except domain_errors() as exc:
                # The API's rejection report: a message, and for row-level failures the
                # invalid-row count and samples (shown as a table).
                err = as_api_error(exc)
                error, status = err.message, err.status
                rejected = (
                    err.details if isinstance(err.details, dict) else {"details": err.details} if err.details else {}
                )
            else:
                if ds.status == DatasetStatus.processing:
                    flash(f"Dataset #{ds.id} uploaded; job #{ds.job_id} is reading it.", "info")
                else:
                    flash(f"Dataset #{ds.id} uploaded: {ds.rows} rows, {ds.invalid_rows} invalid.", "info")
                return redirect(url_for("web.dataset_detail", dataset_id=ds.id))
    kind_filter = request.args.get("show") or ""
    items = datasets_store.of_kinds(
        db_session(), tenant_id(), kinds=(kind_filter,) if kind_filter in DATASET_KINDS else DATASET_KINDS
    )
    return render_template(
        "datasets.html",
        datasets=items,
        form=form,
        error=error,
        errors=errors,
        rejected=rejected,
        kinds=DATASET_KINDS,
        show=kind_filter,
    ), status


@bp.get("/datasets/<id:dataset_id>")
def dataset_detail(dataset_id: int) -> ResponseReturnValue:
    ds = datasets_store.get(db_session(), tenant_id(), dataset_id)
    models = models_store.trained_on(db_session(), tenant_id(), ds.id)
    return render_template("dataset.html", ds=ds, models=models)


# -- models ------------------------------------------------------------------------------


@bp.get("/models")
def models() -> ResponseReturnValue:
    return render_template("models.html", models=models_store.summaries(db_session(), tenant_id(), with_latest=True))


def explain_form_defaults() -> dict[str, str]:
    """The "Explain a molecule / an image" form's fields (app.web.explain reads them)."""
    return {"smiles": "", "ref": "", "coverage": "0.9", "uncertainty": "auto", "method": "gradcam", "sets": ""}


def _model_page(name: str, status: int = 200, **extra: Any) -> ResponseReturnValue:
    try:
        detail = models_store.detail(db_session(), tenant_id(), name)
    except NotFound:
        # A training job names its model before the first version is registered.
        abort(404, f"Model {name!r} has no versions yet (a training job registers one when it succeeds).")
    versions, aliases = detail["versions"], detail["aliases"]
    by_version: dict[int, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    context: dict[str, Any] = {
        "predict_form": {"inputs": "", "ref": ""},
        "predict_errors": {},
        "predict_error": None,
        "explain_form": explain_form_defaults(),
        "explain_errors": {},
        "explain_error": None,
    }
    context.update(extra)
    return render_template(
        "model.html",
        name=name,
        versions=versions,
        aliases=aliases,
        by_version=by_version,
        form_id=uuid.uuid4().hex,  # a fresh one per render: a new submission is a new job
        image_model=bool(versions) and versions[0].input_kind == "image",
        explainable=bool(versions) and versions[0].input_kind in EXPLAINABLE_INPUTS,
        classifier=bool(versions) and versions[0].task == "classification",
        version_trust=trust.version_trust(versions),
        core_metrics=trust.core_metrics,
        max_inputs=MAX_INPUTS,
        **context,
    ), status


@bp.get("/models/<string:name>")
def model_detail(name: str) -> ResponseReturnValue:
    return _model_page(name)


# -- predict from the model's page -------------------------------------------------------

PREDICT_WAIT_S = 5.0  # the page waits this long for the predictions, then links to the job


def _parse_ref(ref: str) -> tuple[int | None, str | None]:
    """The version select's value: "" (latest), "version:3" or "alias:production"."""
    what, _, value = ref.partition(":")
    if what == "version" and value.isdigit():
        return int(value), None
    if what == "alias" and value:
        return None, value
    return None, None


def prediction_table(result: dict[str, Any], shown_inputs: list[str]) -> dict[str, Any]:
    """Rows of input, label (classifiers), one value per output (regression values or class
    probabilities) and error, in input order."""
    predictions = [p if isinstance(p, dict) else {} for p in result.get("predictions") or []]
    has_label = any("label" in p or "labels" in p for p in predictions)
    probabilities = any("probabilities" in p for p in predictions)
    # Columns: the keys of the values (regression targets) or probabilities (class names).
    first = next((p.get("values") or p.get("probabilities") for p in predictions if "error" not in p), None)
    outputs = [str(k) for k in first] if isinstance(first, dict) else [str(o) for o in result.get("outputs") or []]
    rows = []
    for i, pred in enumerate(predictions):
        values = pred.get("values") or pred.get("probabilities") or {}
        label = pred.get("label")
        if isinstance(pred.get("labels"), list):
            label = ", ".join(str(x) for x in pred["labels"]) or "—"
        rows.append(
            {
                "input": shown_inputs[i] if i < len(shown_inputs) else str(pred.get("input", "")),
                "smiles": pred.get("smiles") if pred.get("smiles") != pred.get("input") else None,
                "label": label,
                "values": [values.get(o) for o in outputs],
                "error": pred.get("error"),
            }
        )
    return {
        "outputs": outputs,
        "value_heading": "probability" if probabilities else "value",
        "has_label": has_label,
        "rows": rows,
        "errors": sum(1 for r in rows if r["error"]),
    }


def _predict_inputs(image_model: bool, text: str) -> tuple[list[Any], list[str], dict[str, list[str]]]:
    """(inputs for the predict spec, what the table shows for each, form errors)."""
    if not image_model:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return [], [], {"inputs": ["Enter at least one input, one per line."]}
        if len(lines) > MAX_INPUTS:
            return [], [], {"inputs": [f"At most {MAX_INPUTS} inputs at once; score a library for more."]}
        return list(lines), lines, {}
    files = [f for f in request.files.getlist("files") if f and f.filename]
    if not files:
        return [], [], {"files": ["Choose one or more image files (PNG, JPEG or DICOM)."]}
    if len(files) > MAX_INPUTS:
        return [], [], {"files": [f"At most {MAX_INPUTS} images at once."]}
    limit = settings().max_json_bytes * 3 // 4  # what the API's JSON body holds as base64
    raw = [f.read(limit + 1) for f in files]
    if sum(len(b) for b in raw) > limit:
        return [], [], {"files": [f"The images add up to more than {limit // 1024} KB; send fewer at once."]}
    inputs = [{"image_base64": base64.b64encode(b).decode("ascii")} for b in raw]
    return inputs, [f.filename or f"image {i + 1}" for i, f in enumerate(files)], {}


@bp.post("/models/<string:name>/predict")
def model_predict(name: str) -> ResponseReturnValue:
    """Predict from the page: the API's predict (resolve the version, submit a `predict` job,
    wait briefly), rendered as a table; a job still running after PREDICT_WAIT_S is linked."""
    form = {"inputs": request.form.get("inputs") or "", "ref": request.form.get("ref") or ""}
    version, alias = _parse_ref(form["ref"])
    try:
        mv = models_store.version(db_session(), tenant_id(), name, version, alias)
    except domain_errors() as exc:
        err = as_api_error(exc)
        return _model_page(name, err.status, predict_form=form, predict_error=err.message)
    inputs, shown, errors = _predict_inputs(mv.input_kind == "image", form["inputs"])
    if errors:
        return _model_page(
            name, 400, predict_form=form, predict_errors=errors, predict_error="Please fix the marked fields."
        )
    token = (request.form.get("form_id") or "")[:64]
    try:
        job, _created = jobs_store.submit(
            db_session(),
            celery(),
            database(),
            settings(),
            tenant_id(),
            "predict",
            {"model": f"{mv.name}@{mv.version}", "inputs": inputs},
            idempotency_key=f"web-predict-{token}" if token else None,
        )
    except domain_errors() as exc:
        err = as_api_error(exc)
        return _model_page(name, err.status, predict_form=form, predict_error=err.message)
    state, result, error = jobs_store.wait_finished(
        database(), current_app.extensions["medmaas.hub"], job.id, PREDICT_WAIT_S
    )
    outcome: dict[str, Any] = {
        "job_id": job.id,
        "job_url": url_for("web.job_detail", job_id=job.id),
        "state": state.value,
        "version": mv.version,
        "waited_s": PREDICT_WAIT_S,
    }
    if state == JobState.succeeded and isinstance(result, dict):
        outcome["table"] = prediction_table(result, shown)
    elif state == JobState.failed:
        outcome["error"] = first_line(error) or "unknown error"
    return _model_page(name, predict_form=form, prediction=outcome)


@bp.post("/models/<string:name>/aliases")
def model_set_alias(name: str) -> ResponseReturnValue:
    alias = (request.form.get("alias") or "").strip()
    try:
        version = int(request.form.get("version") or 0)
        if version < 1:
            raise ValueError(version)
        models_store.set_alias(db_session(), tenant_id(), name, alias, version)
    except ValueError:
        flash("Choose a version for the alias.", "error")
    except domain_errors() as exc:
        flash(as_api_error(exc).message, "error")
    else:
        flash(f"{name}@{alias} now points to version {version}.", "info")
    return redirect(url_for("web.model_detail", name=name))


@bp.get("/models/<string:name>/versions/<id:version>/files/<string:which>")
def model_file(name: str, version: int, which: str) -> ResponseReturnValue:
    """Weights (safetensors) or config (JSON) download: the same file and name as the API's."""
    bundle = models_store.bundle_file(db_session(), settings(), tenant_id(), name, version, which)
    return send_artifact(bundle.path, settings(), as_attachment=True, download_name=bundle.download_name)


@bp.get("/models/<string:name>/versions/<id:version>/onnx")
def model_onnx(name: str, version: int) -> ResponseReturnValue:
    """The version's ONNX export (app/stores/onnx.py): the same file and name as the API's."""
    onnx = onnx_store.onnx_file(db_session(), settings(), tenant_id(), name, version)
    return send_artifact(onnx.path, settings(), as_attachment=True, download_name=onnx.download_name)


# -- erasure: confirmation pages, then CSRF-checked POSTs (member role) --------------------


@bp.get("/datasets/<id:dataset_id>/delete")
def dataset_delete_confirm(dataset_id: int) -> ResponseReturnValue:
    require_delete_role()
    ds = datasets_store.get(db_session(), tenant_id(), dataset_id)
    trained = models_store.trained_on(db_session(), tenant_id(), ds.id)
    keeps = f" The {len(trained)} model version(s) trained on it keep working." if trained else ""
    return confirm_delete_page(
        heading=f"Delete dataset #{ds.id} {ds.name}?",
        summary=f"{ds.kind} · {ds.rows} rows · {ds.filename}",
        consequence=f"The uploaded file and its validated data are erased.{keeps}",
        action=url_for("web.dataset_delete", dataset_id=ds.id),
        back=url_for("web.dataset_detail", dataset_id=ds.id),
        back_label=f"Dataset #{ds.id}",
        blocking=datasets_store.jobs_using(db_session(), tenant_id(), ds.id),
    )


@bp.post("/datasets/<id:dataset_id>/delete")
def dataset_delete(dataset_id: int) -> ResponseReturnValue:
    require_delete_role()
    try:
        datasets_store.delete(db_session(), settings(), tenant_id(), dataset_id)
    except Conflict as exc:
        flash(exc.message, "error")
        return redirect(url_for("web.dataset_detail", dataset_id=dataset_id))
    flash(f"Dataset #{dataset_id} deleted.", "info")
    return redirect(url_for("web.datasets"))


@bp.get("/models/<string:name>/delete")
@bp.get("/models/<string:name>/versions/<id:version>/delete")
def model_delete_confirm(name: str, version: int | None = None) -> ResponseReturnValue:
    require_delete_role()
    detail = models_store.detail(db_session(), tenant_id(), name)
    if version is None:
        what, heading = "every version, its weights and every alias", f"Delete model {name}?"
        summary = f"{len(detail['versions'])} version(s)"
    else:
        mv = models_store.version(db_session(), tenant_id(), name, version)
        aliases = sorted(a for a, v in detail["aliases"].items() if v == mv.version)
        what, heading = "its weights and config", f"Delete {name} version {mv.version}?"
        summary = f"{mv.arch} · {mv.task} · {mv.input_kind}" + (f" · aliases {', '.join(aliases)}" if aliases else "")
        if aliases:
            what += " and the aliases pointing at it"
    return confirm_delete_page(
        heading=heading,
        summary=summary,
        consequence=f"The registry forgets {what}; predictions with it answer 404 from then on.",
        action=url_for("web.model_delete", name=name, version=version),
        back=url_for("web.model_detail", name=name),
        back_label=f"Model {name}",
        blocking=models_store.jobs_using(db_session(), tenant_id(), name, version),
    )


@bp.post("/models/<string:name>/delete")
@bp.post("/models/<string:name>/versions/<id:version>/delete")
def model_delete(name: str, version: int | None = None) -> ResponseReturnValue:
    require_delete_role()
    try:
        if version is None:
            models_store.delete_model(db_session(), settings(), tenant_id(), name)
        else:
            models_store.delete_version(db_session(), settings(), tenant_id(), name, version)
    except Conflict as exc:
        flash(exc.message, "error")
        return redirect(url_for("web.model_detail", name=name))
    what = f"Model {name}" if version is None else f"{name} version {version}"
    flash(f"{what} deleted.", "info")
    if version is not None and models_store.version_count(db_session(), tenant_id(), name):
        return redirect(url_for("web.model_detail", name=name))
    return redirect(url_for("web.models"))
