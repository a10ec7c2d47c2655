"""`predict`: online inference for POST /models/{name}/predict, on the inference queue.

Inputs are SMILES / token strings, or images as {"image_base64": "..."} (PNG, JPEG or
DICOM; a DICOM input is de-identified before the job is stored). The run is workers/kinds/predict.py; each invalid input gets its own error there,
also an input with more tokens than the model reads (its `max_len`). Token counts need the
model's tokenizer, which only the worker loads, so the submit-time check refuses just what
is far too long: a SMILES longer than MAX_CHARS_PER_TOKEN x max_len characters, a token
sequence of more than that many whitespace-separated tokens.

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


class PredictSpec(Schema):
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


def check(spec: Spec, ctx: SubmitContext) -> Spec:
    session, tenant_id = ctx.session, ctx.tenant_id
    try:
        mv = resolve_ref(session, tenant_id, spec["model"])
    except ModelNotFound as exc:
        raise unknown_model(exc, spec["model"]) from exc
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
