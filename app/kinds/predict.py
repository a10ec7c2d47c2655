"""`predict`: online inference for POST /models/{name}/predict, on the inference queue.
A call small enough is served without a job (app/inference.py) but validated by the same
check (`check_version`, for the version the URL resolved); the rest run as this kind.

Inputs are SMILES / token strings, or images as {"image_base64": "..."} (PNG, JPEG or
DICOM; a DICOM input is de-identified before the job is stored). The run is workers/kinds/predict.py; each invalid input gets its own error there,
also an input with more tokens than the model reads (its `max_len`). Token counts need the
model's tokenizer, which only the worker loads, so the submit-time check refuses just what
is far too long: a SMILES longer than MAX_CHARS_PER_TOKEN x max_len characters, a token
sequence of more than that many whitespace-separated tokens.

Options (PredictOptions, shared with the POST /models/{name}/predict body): `explain`
draws per-item attributions (SMILES: integrated gradients on the molecule; images: Grad-CAM
or integrated gradients over the picture), `coverage` sets the level of a calibrated
model's prediction intervals / sets, `uncertainty`, `tta` and `prediction_sets` choose
what the spread is computed from. A model that cannot honour an option is a 422 naming
that option (`explain` of a token-sequence model, `prediction_sets` of a regression model);
a SMILES language model (pretrain) is refused for prediction altogether.

Unknown models: a model named inside a spec (`model` here and in `score`) is a 422 naming
the field (`details: {"spec": {"model": [...]}}`); a model named in a URL path is a 404
(app.stores.models). Both messages name the model and say how to list models.
"""

from __future__ import annotations

import base64
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates

from app.config import Settings
from app.errors import NO_NUL_PATTERN
from app.fields import StrictBoolean, StrictFloat, StrictInteger
from app.ingest.deid import Deidentifier, NotDeidentifiable, is_dicom, tenant_seed
from app.kinds import KindSpec, Spec, SpecError, SubmitContext, allowed_queue, queue_or_default, register
from app.models import ModelVersion
from app.registry import ModelNotFound, resolve_ref, split_ref
from app.secret_key import secret_key
from app.stores.models import how_to_list

MAX_INPUTS = 10_000
# A token is at least one character, and rarely more than a few (SMILES: `[C@@H]`, `Cl`;
# clinical codes): longer strings than this many characters per token the model reads are
# refused at submit; shorter ones are counted exactly by the worker.
MAX_CHARS_PER_TOKEN = 4
DEFAULT_MAX_LEN = 256  # the train spec's default, for versions whose spec lacks max_len
MAX_REPORTED = 20  # per-input errors listed in details
# Integrated gradients runs `explain_steps` forward and backward passes per input: an
# explained call takes at most this many inputs (a score job's explain_top_k has the same cap).
MAX_EXPLAINED_INPUTS = 100
EXPLAINABLE_INPUTS = ("smiles", "image")  # as workers/ml/explain.py (the app may not import it)
LANGUAGE_MODEL = "language_model"  # the task of a `pretrain` version


# What one input may be (checked by PredictSpec._input_types), for the OpenAPI document.
INPUT_DOC = {
    "anyOf": [
        {
            "type": "string",
            "pattern": NO_NUL_PATTERN,
            "description": "a SMILES string or a whitespace-separated token sequence",
        },
        {
            "type": "object",
            "properties": {
                "image_base64": {
                    "type": "string",
                    "pattern": NO_NUL_PATTERN,
                    "description": "a PNG, JPEG or DICOM file",
                }
            },
            "required": ["image_base64"],
            "additionalProperties": False,
        },
    ]
}


class PredictOptions(Schema):
    """What a prediction carries besides the values: the predict kind's spec and the body of
    POST /models/{name}/predict both take these."""

    explain = StrictBoolean(
        load_default=False,
        metadata={
            "description": "per input, the attributions: `explanation` with atom_weights (atom index -> "
            f"signed weight, SMILES) or a heat map (images), and the drawing; at most {MAX_EXPLAINED_INPUTS} "
            "inputs; 422 for a model that cannot be explained (token sequences)"
        },
    )
    explain_method = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.OneOf(["ig", "gradcam"]),
        metadata={"description": "ig (integrated gradients) or gradcam (images only; the default for images)"},
    )
    explain_steps = StrictInteger(
        load_default=32,
        validate=validate.Range(min=4, max=256),
        metadata={"description": "integrated-gradients steps"},
    )
    explain_format = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.OneOf(["svg", "png"]),
        metadata={"description": "svg (inline, the default for SMILES) or png (base64; always for images)"},
    )
    coverage = StrictFloat(
        load_default=0.9,
        validate=validate.Range(min=0.5, max=0.99),
        metadata={"description": "coverage of the prediction intervals and sets of a calibrated model"},
    )
    uncertainty = fields.String(
        load_default="auto",
        validate=validate.OneOf(["auto", "mc_dropout", "none"]),
        metadata={"description": "auto: the ensemble's spread when the model has members; mc_dropout; none"},
    )
    tta = StrictInteger(
        load_default=0,
        validate=validate.Range(min=0, max=32),
        metadata={"description": "SMILES models: average over this many random SMILES of each input"},
    )
    prediction_sets = StrictBoolean(
        load_default=False,
        metadata={"description": "classification: the conformal prediction set at `coverage`"},
    )


class PredictSpec(PredictOptions):
    model = fields.String(required=True, metadata={"description": "name, name@version or name@alias"})
    inputs = fields.List(fields.Raw(metadata=INPUT_DOC), required=True, validate=validate.Length(min=1, max=MAX_INPUTS))
    queue = fields.String(load_default=None, allow_none=True)

    @validates("inputs")
    def _input_types(self, inputs: list[Any], **_kw: Any) -> None:
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                continue
            if isinstance(item, dict) and set(item) == {"image_base64"} and isinstance(item["image_base64"], str):
                continue
            raise ValidationError(f'input {i} must be a string or {{"image_base64": ...}} (no other keys)')


def unknown_model(exc: ModelNotFound, ref: str, field: str = "model") -> SpecError:
    """The 422 for a model reference inside a spec that does not resolve: names the model and
    the field, and says how to list models (`score` uses it too)."""
    message = f"{exc.message}; {how_to_list(split_ref(ref)[0])}"
    return SpecError(message, "unknown_model", {"spec": {field: [message]}})


def max_len_of(mv: ModelVersion) -> int:
    """Tokens the model reads (its train spec's max_len)."""
    value = (mv.spec or {}).get("max_len")
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_LEN


def input_size(text: str, input_kind: str) -> tuple[int, str]:
    """(size, unit) the submit-time cap measures: whitespace tokens for token-sequence models
    (exact: their tokenizer splits on whitespace), characters for SMILES."""
    if input_kind == "tokens":
        return len(text.split()), "tokens"
    return len(text), "characters"


def check_lengths(inputs: list[Any], mv: ModelVersion) -> None:
    """SpecError (422) naming the inputs too long to be read by a text model: more than
    MAX_CHARS_PER_TOKEN x max_len characters (SMILES) or whitespace tokens (token sequences)."""
    max_len = max_len_of(mv)
    cap = MAX_CHARS_PER_TOKEN * max_len
    long = []
    for i, x in enumerate(inputs):
        if isinstance(x, str) and len(x) > cap:  # cheap first: no string has more tokens than characters
            size, unit = input_size(x, mv.input_kind)
            if size > cap:
                long.append((i, size, unit))
    if not long:
        return
    reads = f"model {mv.name} v{mv.version} reads at most {max_len} tokens"
    first, n, unit = long[0]
    more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
    raise SpecError(
        f"input {first} is {n} {unit} long{more}; {reads}, so inputs over {cap} {unit} are refused",
        "input_too_long",
        {
            "spec": {
                "inputs": {
                    str(i): [f"input {i} is {n} {unit} long; {reads} (at most {cap} {unit})"]
                    for i, n, unit in long[:MAX_REPORTED]
                }
            }
        },
    )


def option_error(field: str, message: str, code: str = "invalid_option") -> SpecError:
    return SpecError(message, code, {"spec": {field: [message]}})


def refuse_language_model(mv: ModelVersion, field: str = "model") -> None:
    """A SMILES language model predicts next tokens, not properties: refused (422)."""
    if mv.task == LANGUAGE_MODEL:
        raise option_error(
            field,
            f"model {mv.name} v{mv.version} is a SMILES language model (pretrain); it does not predict "
            f'properties: fine-tune it with init_from ("init_from": "{mv.name}@{mv.version}" in a train spec)',
            "language_model",
        )


def check_options(spec: Spec, mv: ModelVersion) -> None:
    """SpecError (422) naming the option a model cannot honour."""
    label = f"model {mv.name} v{mv.version}"
    if spec.get("explain"):
        if mv.input_kind not in EXPLAINABLE_INPUTS:
            raise option_error(
                "explain",
                f"{label} takes {mv.input_kind} input and cannot be explained; attributions are drawn for "
                "SMILES and image models",
                "not_explainable",
            )
        if len(spec["inputs"]) > MAX_EXPLAINED_INPUTS:
            raise option_error(
                "inputs",
                f"explain takes at most {MAX_EXPLAINED_INPUTS} inputs per call, got {len(spec['inputs'])}",
                "too_many_inputs",
            )
    if mv.input_kind != "image" and spec.get("explain_method") == "gradcam":
        raise option_error("explain_method", f"{label} takes {mv.input_kind} input; gradcam is for image models")
    if mv.input_kind == "image" and spec.get("explain_format") == "svg":
        raise option_error("explain_format", f"{label} takes images; their explanations are PNG heat maps")
    if spec.get("tta") and mv.input_kind != "smiles":
        raise option_error("tta", f"{label} takes {mv.input_kind} input; test-time augmentation is for SMILES")
    params = (mv.spec or {}).get("model")
    if spec.get("uncertainty") == "mc_dropout" and isinstance(params, dict) and params.get("dropout") == 0:
        raise option_error("uncertainty", f"{label} was trained without dropout; mc_dropout needs some (use auto)")
    if spec.get("prediction_sets") and mv.task != "classification":
        raise option_error("prediction_sets", f"{label} is a {mv.task} model; prediction sets are for classification")


def check(spec: Spec, ctx: SubmitContext) -> Spec:
    try:
        mv = resolve_ref(ctx.session, ctx.tenant_id, spec["model"])
    except ModelNotFound as exc:
        raise unknown_model(exc, spec["model"]) from exc
    return check_version(spec, ctx, mv)


def check_version(spec: Spec, ctx: SubmitContext, mv: ModelVersion) -> Spec:
    """`check` for the version `spec["model"]` names, already resolved (online predictions
    resolve it from the URL: app/inference.py)."""
    tenant_id = ctx.tenant_id
    refuse_language_model(mv, "explain" if spec.get("explain") else "model")
    check_options(spec, mv)
    wants_images = mv.input_kind == "image"
    if any(isinstance(x, dict) for x in spec["inputs"]) != wants_images or (
        wants_images and not all(isinstance(x, dict) for x in spec["inputs"])
    ):
        takes = 'images as {"image_base64": ...}' if wants_images else "strings (SMILES or token sequences)"
        raise SpecError(f"model {mv.name} v{mv.version} takes {takes}", "invalid_inputs")
    if wants_images:
        seed = tenant_seed(secret_key(ctx.settings), tenant_id)
        spec = {**spec, "inputs": deidentified_images(spec["inputs"], Deidentifier(seed))}
    else:
        check_lengths(spec["inputs"], mv)
    return {**spec, "model_version_id": mv.id, "model_name": mv.name, "version": mv.version}


def deidentified_images(inputs: list[dict[str, Any]], deid: Deidentifier) -> list[dict[str, str]]:
    """Image inputs as the job stores them: only `image_base64`, a DICOM file de-identified
    (app/ingest/deid.py); one that cannot be is a 422, never stored as sent."""
    out = []
    for i, item in enumerate(inputs):
        b64 = item["image_base64"]
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError:  # binascii.Error: the worker reports it as this input's error
            raw = b""
        if is_dicom(raw[:132]):
            try:
                b64 = base64.b64encode(deid.file(raw)[0]).decode("ascii")
            except NotDeidentifiable as exc:
                message = f"input {i} is a DICOM file that cannot be de-identified: {exc}"
                raise SpecError(message, "invalid_inputs", {"spec": {"inputs": {str(i): [message]}}}) from None
        out.append({"image_base64": b64})
    return out


def route(spec: Spec, settings: Settings) -> str:
    return allowed_queue("predict", queue_or_default(spec, settings.inference_queue), settings)


def queues(settings: Settings) -> tuple[str, ...]:
    return (settings.inference_queue,)


register(
    KindSpec("predict", PredictSpec, route, "online predictions from a registered model", check=check, queues=queues)
)
