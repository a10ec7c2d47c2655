"""`train`: fit a CNN (images) or RNN (SMILES / token sequences) on an uploaded dataset
(spec, submit-time check, route). The run is workers/kinds/train.py: it checkpoints every
epoch and registers the result as a new model version."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.kinds import KindSpec, Spec, SpecError, register
from app.models import Dataset

MODEL_NAME = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", error="letters, digits, '.', '_', '-' (max 128)")
RNN_PARAMS = {"cell", "embedding_dim", "hidden_size", "num_layers", "bidirectional", "dropout"}
CNN_PARAMS = {"channels", "kernel_size", "hidden", "dropout", "batch_norm", "pool_to"}


class SplitSpec(Schema):
    train = fields.Float(validate=validate.Range(min=0, max=1))
    val = fields.Float(validate=validate.Range(min=0, max=1))
    test = fields.Float(validate=validate.Range(min=0, max=1))
    method = fields.String(load_default="random", validate=validate.OneOf(["random", "scaffold"]))

    @validates_schema
    def _sums_to_one(self, data: dict[str, Any], **_kw: Any) -> None:
        fractions = [data[k] for k in ("train", "val", "test") if k in data]
        if len(fractions) == 3 and abs(sum(fractions) - 1.0) > 1e-6:
            raise ValidationError("train + val + test must sum to 1")


class TrainSpec(Schema):
    model_name = fields.String(required=True, validate=MODEL_NAME)
    dataset_id = fields.Integer(required=True, strict=True)
    arch = fields.String(required=True, validate=validate.OneOf(["cnn", "rnn"]))
    task = fields.String(
        load_default="classification", validate=validate.OneOf(["classification", "multilabel", "regression"])
    )
    target = fields.Raw(load_default=None, metadata={"description": "label column, or a list of columns"})
    model = fields.Dict(load_default=dict, metadata={"description": "architecture hyper-parameters"})
    epochs = fields.Integer(load_default=10, validate=validate.Range(min=1, max=10_000))
    batch_size = fields.Integer(load_default=64, validate=validate.Range(min=1, max=65_536))
    lr = fields.Float(load_default=1e-3, validate=validate.Range(min=0, min_inclusive=False, max=10))
    optimizer = fields.String(load_default="adamw", validate=validate.OneOf(["adam", "adamw", "sgd"]))
    weight_decay = fields.Float(load_default=0.0, validate=validate.Range(min=0))
    scheduler = fields.String(load_default="none", validate=validate.OneOf(["none", "cosine", "step", "plateau"]))
    early_stopping_patience = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1))
    monitor = fields.String(load_default="loss")
    grad_clip = fields.Float(load_default=None, allow_none=True, validate=validate.Range(min=0, min_inclusive=False))
    seed = fields.Integer(load_default=0)
    split = fields.Nested(SplitSpec, load_default=None, allow_none=True)
    device = fields.String(load_default="auto", validate=validate.Regexp(r"^(auto|cpu|cuda(:\d+)?)$"))
    max_len = fields.Integer(load_default=256, validate=validate.Range(min=8, max=10_000))
    tokenizer = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(["smiles", "whitespace"]))
    queue = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def _model_params(self, data: dict[str, Any], **_kw: Any) -> None:
        allowed = RNN_PARAMS if data.get("arch") == "rnn" else CNN_PARAMS
        unknown = sorted(set(data.get("model") or {}) - allowed)
        if unknown:
            raise ValidationError(
                f"unknown {data.get('arch')} parameters {unknown}; allowed: {sorted(allowed)}", "model"
            )
        target = data.get("target")
        if target is not None and not (
            isinstance(target, str) or (isinstance(target, list) and target and all(isinstance(t, str) for t in target))
        ):
            raise ValidationError("target must be a column name or a list of column names", "target")


def check(spec: Spec, session: Session, tenant_id: int) -> Spec:
    """The dataset must exist for this tenant and fit the architecture, task and target."""
    ds = session.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == tenant_id))
    if ds is None:
        raise SpecError(
            f"Dataset {spec['dataset_id']} not found", "unknown_dataset", {"spec": {"dataset_id": spec["dataset_id"]}}
        )
    wanted = {"cnn": "images", "rnn": "sequences"}[spec["arch"]]
    if ds.kind != wanted:
        raise SpecError(f"arch {spec['arch']} trains on {wanted} datasets; dataset {ds.id} holds {ds.kind}")
    if ds.kind == "sequences":
        label_types = ds.schema.get("label_types", {})
        targets = spec["target"] or list(label_types)
        targets = [targets] if isinstance(targets, str) else targets
        if not targets:
            raise SpecError("the dataset has no label columns to train on")
        missing = [t for t in targets if t not in label_types]
        if missing:
            raise SpecError(
                f"unknown target column(s) {missing}; the dataset's label columns are {sorted(label_types)}",
                details={"spec": {"target": sorted(label_types)}},
            )
        if spec["task"] == "regression":
            wrong = [t for t in targets if label_types[t] != "float"]
            if wrong:
                raise SpecError(f"regression needs numeric targets; {wrong} hold categories", "invalid_labels")
        if spec["task"] == "classification" and len(targets) > 1:
            raise SpecError("classification takes one target column; use task multilabel for several")
        spec = {**spec, "target": targets if len(targets) > 1 else targets[0]}
    elif spec["task"] == "regression" and ds.schema.get("label_kind") not in (None, "regression", "float"):
        raise SpecError("this image dataset has class labels; use task classification or multilabel", "invalid_labels")
    return {**spec, "dataset_sha256": ds.sha256}


def route(spec: Spec, settings: Settings) -> str:
    if spec.get("queue"):
        return spec["queue"]
    return settings.gpu_queue if spec["device"].startswith("cuda") else settings.default_queue


register(KindSpec("train", TrainSpec, route, "train a CNN or RNN and register a model version", check=check))
