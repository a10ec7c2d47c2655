"""Runs `predict` (spec: app/kinds/predict.py): online inference on the inference queue.

Inputs are SMILES / token strings, or images as {"image_base64": "..."} (PNG, JPEG or
DICOM). Each invalid input gets its own error; the valid ones are still scored (and, with
`explain`, explained: workers/ml/explain.py attributes, workers/ml/draw.py draws).
"""

from __future__ import annotations

import base64
import io
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
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
        return np.array(img.convert("RGB") if img.mode not in ("L", "RGB") else img)  # writable, for torch


# The spec's prediction options (app/kinds/predict.py PredictOptions) and their defaults, for
# specs stored before the options existed.
PREDICTION_OPTIONS: dict[str, Any] = {"coverage": 0.9, "uncertainty": "auto", "tta": 0, "prediction_sets": False}
METHOD_NAMES = {"ig": "integrated_gradients", "gradcam": "grad_cam"}


class SharedOrAlone:
    """A readers-writer lock: many holders of `shared()` at once, or one of `alone()`.

    The inference worker runs predict jobs on threads that share one Predictor per model
    (workers/model_cache.py). Explanations (Captum's forward hooks on the model) and MC
    dropout (dropout switched on in the model) change the shared model while they run, so
    they run alone; plain predictions run together. A waiting `alone()` holds new `shared()`
    callers back, so a stream of predictions cannot starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._alone and not self._shared)
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


_guards: weakref.WeakKeyDictionary[Predictor, SharedOrAlone] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def guard_of(predictor: Predictor) -> SharedOrAlone:
    with _guards_lock:
        guard = _guards.get(predictor)
        if guard is None:
            guard = _guards[predictor] = SharedOrAlone()
        return guard


def prediction_options(spec: Spec) -> dict[str, Any]:
    return {name: spec.get(name, default) for name, default in PREDICTION_OPTIONS.items()}


def predict_inputs(
    predictor: Predictor,
    inputs: list[Any],
    label: str | None = None,
    options: dict[str, Any] | None = None,
    explain: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One item per input. Text inputs with more tokens than the model reads (its max_len)
    get an `error` naming the input and the model (label), not a truncated prediction.
    options: the Predictor's keyword options (coverage, uncertainty, tta, prediction_sets);
    explain ({"method", "steps", "format"}, or None): add an `explanation` to each item
    that has a prediction."""
    options = options or {}
    changes_model = explain is not None or options.get("uncertainty") == "mc_dropout"
    guard = guard_of(predictor)
    with guard.alone() if changes_model else guard.shared():
        return _predict_inputs(predictor, inputs, label, options, explain)


def _predict_inputs(
    predictor: Predictor,
    inputs: list[Any],
    label: str | None,
    options: dict[str, Any],
    explain: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    if predictor.input["kind"] != "image":
        results = predictor.predict(inputs, label=label, **options)
        if explain is not None:
            add_smiles_explanations(predictor, results, **explain)
        return results
    results = [{} for _ in inputs]  # every slot is filled below
    images, where = [], []
    for i, item in enumerate(inputs):
        try:
            images.append(decode_image(item))
            where.append(i)
        except Exception as exc:
            results[i] = {"error": f"unreadable image: {type(exc).__name__}: {exc}"}
    if images:
        for i, pred in zip(where, predictor.predict_images(images, **options), strict=False):
            results[i] = pred
        if explain is not None:
            add_image_explanations(predictor, results, where, images, **explain)
    return results


def explained_output(predictor: Predictor, item: dict[str, Any]) -> str:
    """The output an item's explanation leads with: the predicted class of a classifier,
    else the model's first output."""
    if predictor.head.name == "classification" and "label" in item:
        return f"p_{item['label']}"
    return predictor.output_names[0]


def drawing(smiles: str, atom_weights: dict[int, float], legend: str, fmt: str) -> dict[str, str]:
    from workers.ml.draw import molecule_png, molecule_svg

    if fmt == "png":
        png = molecule_png(smiles, atom_weights=atom_weights, legend=legend)
        return {"png_base64": base64.b64encode(png).decode("ascii")}
    return {"svg": molecule_svg(smiles, atom_weights=atom_weights, legend=legend)}


def rounded_weights(atom_weights: dict[int, float]) -> dict[str, float]:
    return {str(int(i)): round(float(w), 4) for i, w in sorted(atom_weights.items(), key=lambda kv: int(kv[0]))}


def smiles_explanation(
    predictor: Predictor, smiles: str, attribution: dict[str, Any], lead: str, steps: int, fmt: str
) -> dict[str, Any]:
    """The `explanation` of one molecule from explain_smiles' dict: the lead output's atom
    weights and drawing first, every output's under `outputs` for a multi-output model; an
    `error` where its atoms could not be attributed."""
    if "error" in attribution:
        return {"method": METHOD_NAMES["ig"], "steps": steps, "error": attribution["error"]}
    per_output = {}
    for name, found in attribution["outputs"].items():
        weights = {int(i): float(w) for i, w in found["atom_weights"].items()}
        legend = f"{name} = {found['prediction']:.3g}" if "prediction" in found else str(name)
        per_output[name] = {"atom_weights": rounded_weights(weights), **drawing(smiles, weights, legend, fmt)}
    lead = lead if lead in per_output else next(iter(per_output))
    out: dict[str, Any] = {"method": METHOD_NAMES["ig"], "steps": steps, "output": lead, **per_output[lead]}
    if len(per_output) > 1:
        out["outputs"] = per_output
    return out


def add_smiles_explanations(
    predictor: Predictor, results: list[dict[str, Any]], *, method: str, steps: int, format: str
) -> None:
    """Integrated gradients of every predicted molecule (canonical SMILES), drawn on it; the
    items with an error are left as they are. A classifier's molecules are explained for
    their predicted class only (grouped by class: one IG run per class present); other
    models for every output."""
    from workers.ml.explain import explain_smiles

    explained = [i for i, item in enumerate(results) if "error" not in item and item.get("smiles")]
    groups: dict[int | None, list[int]] = {}
    for i in explained:
        target = None
        if predictor.head.name == "classification":
            target = predictor.output_names.index(explained_output(predictor, results[i]))
        groups.setdefault(target, []).append(i)
    for target, members in groups.items():
        attributions = explain_smiles(predictor, [results[i]["smiles"] for i in members], steps=steps, target=target)
        for i, attribution in zip(members, attributions, strict=True):
            item = results[i]
            item["explanation"] = smiles_explanation(
                predictor, item["smiles"], attribution, explained_output(predictor, item), steps, format
            )


def add_image_explanations(
    predictor: Predictor,
    results: list[dict[str, Any]],
    where: list[int],
    images: list[np.ndarray],
    *,
    method: str,
    steps: int,
    format: str,
) -> None:
    """Grad-CAM (or integrated gradients) heat map of every predicted image, drawn over it
    as PNG; unreadable images keep their error."""
    from workers.ml.draw import heatmap_png
    from workers.ml.explain import explain_images

    pairs = [(i, image) for i, image in zip(where, images, strict=True) if "error" not in results[i]]
    if not pairs:
        return
    found = explain_images(predictor, [image for _, image in pairs], method=method, steps=steps)
    for (i, image), heat in zip(pairs, found, strict=True):
        described = {"method": METHOD_NAMES[method], **({"steps": steps} if method == "ig" else {})}
        if "error" in heat:
            results[i]["explanation"] = {**described, "error": heat["error"]}
            continue
        heatmap = heat["heatmap"]
        results[i]["explanation"] = {
            **described,
            "output": predictor.output_names[int(heat["target"])],
            "heatmap_shape": [int(n) for n in heatmap.shape],
            "png_base64": base64.b64encode(heatmap_png(image, heatmap)).decode("ascii"),
        }


def explain_options(spec: Spec, input_kind: str) -> dict[str, Any] | None:
    """What add_*_explanations take, from the spec; None without `explain`."""
    if not spec.get("explain"):
        return None
    images = input_kind == "image"
    return {
        "method": spec.get("explain_method") or ("gradcam" if images else "ig"),
        "steps": int(spec.get("explain_steps") or 32),
        "format": "png" if images else (spec.get("explain_format") or "svg"),
    }


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
    return get_predictor(bundle, ctx.settings.model_cache_size, backend=ctx.settings.scoring_backend)


def run(ctx: JobContext, spec: Spec) -> JobResult:
    predictor = load_predictor(ctx, spec["model_version_id"])
    predictions = predict_inputs(
        predictor,
        spec["inputs"],
        label=f"{spec['model_name']} v{spec['version']}",
        options=prediction_options(spec),
        explain=explain_options(spec, predictor.input["kind"]),
    )
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
