"""Runs `predict` (spec: app/kinds/predict.py): online inference on the inference queue.

Inputs are SMILES / token strings, or images as {"image_base64": "..."} (PNG, JPEG or
DICOM). Each invalid input gets its own error; the valid ones are still scored.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

from app.kinds import Spec
from app.models import UsageMetric
from app.stores.usage import Quantity, model_of
from workers.kinds import JobResult
from workers.runtime import JobContext

if TYPE_CHECKING:
    import numpy as np

    from workers.ml.predict import Predictor


def decode_image(item: dict[str, Any]) -> np.ndarray:
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


def predict_inputs(predictor: Predictor, inputs: list[Any], label: str | None = None) -> list[dict[str, Any]]:
    """One item per input. Text inputs with more tokens than the model reads (its max_len)
    get an `error` naming the input and the model (label), not a truncated prediction."""
    if predictor.input["kind"] != "image":
        return predictor.predict(inputs, label=label)
    results: list[dict[str, Any]] = [{} for _ in inputs]  # every slot is filled below
    images, where = [], []
    for i, item in enumerate(inputs):
        try:
            images.append(decode_image(item))
            where.append(i)
        except Exception as exc:
            results[i] = {"error": f"unreadable image: {type(exc).__name__}: {exc}"}
    if images:
        for i, pred in zip(where, predictor.predict_images(images), strict=False):
            results[i] = pred
    return results


def load_predictor(ctx: JobContext, model_version_id: int) -> Predictor:
    from app.artifacts import ArtifactStore
    from app.models import ModelVersion
    from workers.model_cache import get_predictor

    with ctx.db.session() as s:
        mv = s.get(ModelVersion, model_version_id)
        if mv is None or mv.tenant_id != ctx.tenant_id:
            raise ValueError(f"model version {model_version_id} no longer exists")
        uri = mv.artifact_uri
    bundle = ArtifactStore.from_settings(ctx.settings).path(uri)
    return get_predictor(bundle, ctx.settings.model_cache_size)


def run(ctx: JobContext, spec: Spec) -> JobResult:
    predictor = load_predictor(ctx, spec["model_version_id"])
    predictions = predict_inputs(predictor, spec["inputs"], label=f"{spec['model_name']} v{spec['version']}")
    return {
        "model": spec["model_name"],
        "version": spec["version"],
        "predictions": predictions,
        "outputs": predictor.output_names,
    }


def metered_predictions(spec: Spec, result: JobResult | None) -> list[Quantity]:
    """A succeeded predict job is one call with len(inputs) inputs for its model version."""
    model, version = model_of(spec, result)
    return [
        Quantity(UsageMetric.predict_calls, 1, model, version),
        Quantity(UsageMetric.predict_inputs, len(spec.get("inputs") or []), model, version),
    ]
