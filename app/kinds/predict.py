"""`predict`: online inference for POST /models/{name}/predict, on the inference queue.

Inputs are SMILES / token strings, or images as {"image_base64": "..."} (PNG, JPEG or
DICOM). The run is workers/kinds/predict.py; each invalid input gets its own error there.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates
from sqlalchemy.orm import Session

from app.config import Settings
from app.kinds import KindSpec, Spec, SpecError, queue_or_default, register
from app.registry import ModelNotFound, resolve_ref

MAX_INPUTS = 10_000


class PredictSpec(Schema):
    model = fields.String(required=True, metadata={"description": "name, name@version or name@alias"})
    inputs = fields.List(fields.Raw(), required=True, validate=validate.Length(min=1, max=MAX_INPUTS))
    queue = fields.String(load_default=None, allow_none=True)

    @validates("inputs")
    def _input_types(self, inputs: list[Any], **_kw: Any) -> None:
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                continue
            if isinstance(item, dict) and isinstance(item.get("image_base64"), str):
                continue
            raise ValidationError(f'input {i} must be a string or {{"image_base64": ...}}')


def check(spec: Spec, session: Session, tenant_id: int) -> Spec:
    try:
        mv = resolve_ref(session, tenant_id, spec["model"])
    except ModelNotFound as exc:
        raise SpecError(str(exc), "unknown_model") from exc
    wants_images = mv.input_kind == "image"
    if any(isinstance(x, dict) for x in spec["inputs"]) != wants_images or (
        wants_images and not all(isinstance(x, dict) for x in spec["inputs"])
    ):
        takes = 'images as {"image_base64": ...}' if wants_images else "strings (SMILES or token sequences)"
        raise SpecError(f"model {mv.name} v{mv.version} takes {takes}", "invalid_inputs")
    return {**spec, "model_version_id": mv.id, "model_name": mv.name, "version": mv.version}


def route(spec: Spec, settings: Settings) -> str:
    return queue_or_default(spec, settings.inference_queue)


register(KindSpec("predict", PredictSpec, route, "online predictions from a registered model", check=check))
