"""Dataset and model-registry pages: upload with validation report, versions with metrics,
aliases, weights download.

Uploads, look-ups and the registry rules (aliases, bundle files) are the stores'
(app.stores.datasets, app.stores.models), as for the API; only authentication (session
cookie + CSRF) and rendering differ. The stores' errors render as this page's form errors
(with the status and message app.errors gives the API), or as error pages.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import abort, flash, redirect, render_template, request, send_file, url_for
from flask.typing import ResponseReturnValue
from marshmallow import ValidationError

from app.api import db_session, settings, tenant_id
from app.api.datasets import DatasetUploadForm
from app.errors import as_api_error, domain_errors
from app.stores import NotFound
from app.stores import datasets as datasets_store
from app.stores import models as models_store
from app.web.blueprint import bp

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


@bp.get("/datasets/<int:dataset_id>")
def dataset_detail(dataset_id: int) -> ResponseReturnValue:
    ds = datasets_store.get(db_session(), tenant_id(), dataset_id)
    models = models_store.trained_on(db_session(), tenant_id(), ds.id)
    return render_template("dataset.html", ds=ds, models=models)


# -- models ------------------------------------------------------------------------------


@bp.get("/models")
def models() -> ResponseReturnValue:
    return render_template("models.html", models=models_store.summaries(db_session(), tenant_id(), with_latest=True))


@bp.get("/models/<string:name>")
def model_detail(name: str) -> ResponseReturnValue:
    try:
        detail = models_store.detail(db_session(), tenant_id(), name)
    except NotFound:
        # A training job names its model before the first version is registered.
        abort(404, f"Model {name!r} has no versions yet (a training job registers one when it succeeds).")
    versions, aliases = detail["versions"], detail["aliases"]
    by_version: dict[int, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    return render_template(
        "model.html", name=name, versions=versions, aliases=aliases, by_version=by_version, form_id=uuid.uuid4().hex
    )


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


@bp.get("/models/<string:name>/versions/<int:version>/files/<string:which>")
def model_file(name: str, version: int, which: str) -> ResponseReturnValue:
    """Weights (safetensors) or config (JSON) download: the same file and name as the API's."""
    bundle = models_store.bundle_file(db_session(), settings(), tenant_id(), name, version, which)
    return send_file(bundle.path, as_attachment=True, download_name=bundle.download_name)
