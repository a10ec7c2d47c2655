"""A model version's ONNX export (`model.onnx` in its bundle, written by the train worker:
workers/ml/onnx_export.py) and what the registry records about it (`metrics["onnx"]`).

Core code: reads the file and the row, never torch or onnx."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app import artifacts
from app.artifacts import ArtifactStore
from app.config import Settings
from app.models import ModelVersion
from app.stores import models as models_store
from app.stores.errors import NotFound
from app.stores.models import BundleFile

ONNX_FILE = "model.onnx"  # workers/ml/onnx_export.py ONNX_FILE
BACKFILL = "python -m workers.ml.onnx_export backfill"
EXPORTED_TASKS = ("classification", "multilabel", "regression")  # workers/ml/onnx_export.py EXPORTED_TASKS


def record(mv: ModelVersion) -> dict[str, Any] | None:
    """metrics["onnx"] of a version: {opset, max_abs_diff, inputs, outputs, ...}, {error}
    when the export failed its check, None for a version registered before exports."""
    onnx = (mv.metrics or {}).get("onnx")
    return onnx if isinstance(onnx, dict) else None


def missing_reason(mv: ModelVersion) -> str:
    """Why a version has no model.onnx to download, and what to do about it."""
    onnx = record(mv)
    label = f"{mv.name} v{mv.version}"
    if mv.task not in EXPORTED_TASKS:
        return f"{label} is a {mv.task.replace('_', ' ')}, which has no ONNX export (only predictive models do)"
    if onnx is not None and onnx.get("error"):
        return f"{label} has no ONNX export: it failed its check at export ({onnx['error']})"
    if onnx is None:
        return (
            f"{label} was registered before ONNX export existed; an operator exports it on a worker host "
            f"with `{BACKFILL} --model {mv.name} --version {mv.version}`"
        )
    return f"{ONNX_FILE} of {label} is missing from the artifact store"


def onnx_file(session: Session, settings: Settings, tenant_id: int, name: str, number: int) -> BundleFile:
    """The version's model.onnx; NotFound (404) naming why when there is none."""
    mv = models_store.version(session, tenant_id, name, number)
    path = ArtifactStore.from_settings(settings).path(mv.artifact_uri) / ONNX_FILE
    if not artifacts.is_file(path):
        raise NotFound(missing_reason(mv), "onnx_not_exported", {"onnx": record(mv)})
    return BundleFile(path, f"{name}-v{number}.onnx")
