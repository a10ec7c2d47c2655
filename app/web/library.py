"""Dataset and model-registry pages: upload with validation report, versions with metrics,
aliases, weights download.

The upload and alias views call the API's own view functions (app.api.datasets.upload,
app.api.models.set_alias) undecorated, so validation, storage and the registry rules are
the API's; only authentication (session cookie + CSRF) and rendering differ.
"""
from __future__ import annotations

import inspect
import uuid
from typing import Any, Iterable

from flask import abort, flash, redirect, render_template, request, url_for
from marshmallow import ValidationError
from sqlalchemy import select

from app import registry
from app.api import db_session, tenant_id
from app.errors import ApiError
from app.models import Dataset, ModelVersion
from app.web.blueprint import bp

DATASET_KINDS = ("sequences", "images", "library")


def _undecorated(view: Any) -> Any:
    """The function under flask-smorest's argument/response decorators."""
    return inspect.unwrap(view)


def tenant_datasets(kinds: Iterable[str] = DATASET_KINDS, limit: int = 500) -> list[Dataset]:
    return list(db_session().scalars(
        select(Dataset).where(Dataset.tenant_id == tenant_id(), Dataset.kind.in_(list(kinds)))
        .order_by(Dataset.id.desc()).limit(limit)
    ).all())


def model_choices() -> list[str]:
    """`name`, `name@alias` and `name@version` references for the score form's suggestions."""
    session, out = db_session(), []
    for name, latest, _count in registry.model_names(session, tenant_id()):
        out.append(name)
        out.extend(f"{name}@{alias}" for alias in sorted(registry.aliases_for(session, tenant_id(), name)))
        out.append(f"{name}@{latest}")
    return out


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
def datasets():  # noqa: ANN201
    from app.api import datasets as datasets_api

    form = {"kind": request.args.get("kind") or "sequences", "name": "", "options": "text_column=smiles"}
    error, errors, rejected, status = None, {}, {}, 200
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
            loaded = datasets_api.DatasetUploadForm().load(fields)
        except ValidationError as exc:
            errors.update(exc.messages if isinstance(exc.messages, dict) else {"form": exc.messages})
        if errors:
            error, status = "Please fix the marked fields.", 400
        else:
            try:
                ds = _undecorated(datasets_api.upload)(loaded, {"file": upload})
            except ApiError as exc:
                # The API's rejection report: a message, and for row-level failures the
                # invalid-row count and samples (shown as a table).
                error, status = exc.message, exc.status
                rejected = exc.details if isinstance(exc.details, dict) else {"details": exc.details} if exc.details else {}
            else:
                flash(f"Dataset #{ds.id} uploaded: {ds.rows} rows, {ds.invalid_rows} invalid.", "info")
                return redirect(url_for("web.dataset_detail", dataset_id=ds.id))
    kind_filter = request.args.get("show") or ""
    items = tenant_datasets(kinds=(kind_filter,) if kind_filter in DATASET_KINDS else DATASET_KINDS)
    return render_template("datasets.html", datasets=items, form=form, error=error, errors=errors,
                           rejected=rejected, kinds=DATASET_KINDS, show=kind_filter), status


@bp.get("/datasets/<int:dataset_id>")
def dataset_detail(dataset_id: int):  # noqa: ANN201
    ds = db_session().scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id()))
    if ds is None:
        abort(404, f"Dataset {dataset_id} not found.")
    models = db_session().scalars(select(ModelVersion).where(
        ModelVersion.tenant_id == tenant_id(), ModelVersion.dataset_id == ds.id).order_by(ModelVersion.id.desc())).all()
    return render_template("dataset.html", ds=ds, models=models)


# -- models ------------------------------------------------------------------------------

@bp.get("/models")
def models():  # noqa: ANN201
    session = db_session()
    items = []
    for name, latest, count in registry.model_names(session, tenant_id()):
        mv = registry.resolve(session, tenant_id(), name, version=latest)
        items.append({"name": name, "latest": mv, "versions": count,
                      "aliases": registry.aliases_for(session, tenant_id(), name)})
    return render_template("models.html", models=items)


@bp.get("/models/<string:name>")
def model_detail(name: str):  # noqa: ANN201
    session = db_session()
    versions = session.scalars(select(ModelVersion).where(
        ModelVersion.tenant_id == tenant_id(), ModelVersion.name == name).order_by(ModelVersion.version.desc())).all()
    if not versions:
        # A training job names its model before the first version is registered.
        abort(404, f"Model {name!r} has no versions yet (a training job registers one when it succeeds).")
    aliases = registry.aliases_for(session, tenant_id(), name)
    by_version: dict[int, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    return render_template("model.html", name=name, versions=versions, aliases=aliases, by_version=by_version,
                           form_id=uuid.uuid4().hex)


@bp.post("/models/<string:name>/aliases")
def model_set_alias(name: str):  # noqa: ANN201
    from app.api import models as models_api

    alias = (request.form.get("alias") or "").strip()
    try:
        body = models_api.AliasSchema().load({"version": int(request.form.get("version") or 0)})
        _undecorated(models_api.set_alias)(body, name, alias)
    except (ValueError, ValidationError):
        flash("Choose a version for the alias.", "error")
    except ApiError as exc:
        flash(exc.message, "error")
    else:
        flash(f"{name}@{alias} now points to version {body['version']}.", "info")
    return redirect(url_for("web.model_detail", name=name))


@bp.get("/models/<string:name>/versions/<int:version>/files/<string:which>")
def model_file(name: str, version: int, which: str):  # noqa: ANN201
    """Weights (safetensors) or config (JSON) download, served by the API's own view."""
    from app.api import models as models_api

    return _undecorated(models_api.version_file)(name, version, which)
