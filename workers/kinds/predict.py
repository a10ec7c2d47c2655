"""`predict`: online inference for POST /models/{name}/predict, on the inference queue.

Inputs are SMILES / token strings, or images as {"image_base64": "..."} (PNG, JPEG or
DICOM). Each invalid input gets its own error; the valid ones are still scored.
"""
from __future__ import annotations

import base64
import io
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates

from app.config import Settings
from workers.kinds import JobKind, SpecError, register

MAX_INPUTS = 10_000


class PredictSpec(Schema):
    model = fields.String(required=True, metadata={"description": "name, name@version or name@alias"})
    inputs = fields.List(fields.Raw(), required=True, validate=validate.Length(min=1, max=MAX_INPUTS))
    queue = fields.String(load_default=None, allow_none=True)

    @validates("inputs")
    def _input_types(self, inputs: list, **_kw: Any) -> None:
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                continue
            if isinstance(item, dict) and isinstance(item.get("image_base64"), str):
                continue
            raise ValidationError(f"input {i} must be a string or {{\"image_base64\": ...}}")


def check(spec: dict[str, Any], session, tenant_id: int) -> dict[str, Any]:  # noqa: ANN001
    from app.registry import ModelNotFound, resolve_ref

    try:
        mv = resolve_ref(session, tenant_id, spec["model"])
    except ModelNotFound as exc:
        raise SpecError(str(exc), "unknown_model")
    wants_images = mv.input_kind == "image"
    if any(isinstance(x, dict) for x in spec["inputs"]) != wants_images or \
            (wants_images and not all(isinstance(x, dict) for x in spec["inputs"])):
        takes = 'images as {"image_base64": ...}' if wants_images else "strings (SMILES or token sequences)"
        raise SpecError(f"model {mv.name} v{mv.version} takes {takes}", "invalid_inputs")
    return {**spec, "model_version_id": mv.id, "model_name": mv.name, "version": mv.version}


def route(spec: dict[str, Any], settings: Settings) -> str:
    return spec.get("queue") or settings.inference_queue


def decode_image(item: dict[str, Any]):  # noqa: ANN201
    """PNG/JPEG via Pillow, DICOM via pydicom (detected by its 'DICM' preamble marker)."""
    import numpy as np

    raw = base64.b64decode(item["image_base64"], validate=True)
    if raw[128:132] == b"DICM":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(raw))
        pixels = ds.pixel_array.astype(np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = (pixels - lo) / (hi - lo or 1.0) * 255.0
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            pixels = 255.0 - pixels
        return pixels.astype(np.uint8)
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as img:
        img.load()
        return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)


def predict_inputs(predictor, inputs: list) -> list[dict[str, Any]]:  # noqa: ANN001
    if predictor.input["kind"] != "image":
        return predictor.predict(inputs)
    results: list[dict[str, Any] | None] = [None] * len(inputs)
    images, where = [], []
    for i, item in enumerate(inputs):
        try:
            images.append(decode_image(item))
            where.append(i)
        except Exception as exc:  # noqa: BLE001  (one bad image must not fail the others)
            results[i] = {"error": f"unreadable image: {type(exc).__name__}: {exc}"}
    if images:
        for i, pred in zip(where, predictor.predict_images(images)):
            results[i] = pred
    return results  # type: ignore[return-value]


def load_predictor(ctx, model_version_id: int):  # noqa: ANN001, ANN201
    from app.artifacts import ArtifactStore
    from app.models import ModelVersion
    from workers.model_cache import get_predictor

    with ctx.db.session() as s:
        mv = s.get(ModelVersion, model_version_id)
        if mv is None or mv.tenant_id != ctx.tenant_id:
            raise ValueError(f"model version {model_version_id} no longer exists")
        uri = mv.artifact_uri
    bundle = ArtifactStore(ctx.settings.artifacts).path(uri)
    return get_predictor(bundle, ctx.settings.model_cache_size)


def run(ctx, spec: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    predictor = load_predictor(ctx, spec["model_version_id"])
    predictions = predict_inputs(predictor, spec["inputs"])
    return {"model": spec["model_name"], "version": spec["version"], "predictions": predictions,
            "outputs": predictor.output_names}


register(JobKind("predict", PredictSpec, run, route, "online predictions from a registered model", check=check))
