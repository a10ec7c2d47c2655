"""`train`: fit a CNN (images) or RNN (SMILES / token sequences) on an uploaded dataset,
checkpointing every epoch, and register the result as a new model version."""
from __future__ import annotations

import logging
import time
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.config import Settings
from workers.kinds import JobKind, SpecError, register

log = logging.getLogger(__name__)

MODEL_NAME = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", error="letters, digits, '.', '_', '-' (max 128)")
RNN_PARAMS = {"cell", "embedding_dim", "hidden_size", "num_layers", "bidirectional", "dropout"}
CNN_PARAMS = {"channels", "kernel_size", "hidden", "dropout", "batch_norm", "pool_to"}


class SplitSpec(Schema):
    train = fields.Float(validate=validate.Range(min=0, max=1))
    val = fields.Float(validate=validate.Range(min=0, max=1))
    test = fields.Float(validate=validate.Range(min=0, max=1))
    method = fields.String(load_default="random", validate=validate.OneOf(["random", "scaffold"]))

    @validates_schema
    def _sums_to_one(self, data: dict, **_kw: Any) -> None:
        fractions = [data[k] for k in ("train", "val", "test") if k in data]
        if len(fractions) == 3 and abs(sum(fractions) - 1.0) > 1e-6:
            raise ValidationError("train + val + test must sum to 1")


class TrainSpec(Schema):
    model_name = fields.String(required=True, validate=MODEL_NAME)
    dataset_id = fields.Integer(required=True, strict=True)
    arch = fields.String(required=True, validate=validate.OneOf(["cnn", "rnn"]))
    task = fields.String(load_default="classification",
                         validate=validate.OneOf(["classification", "multilabel", "regression"]))
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
    def _model_params(self, data: dict, **_kw: Any) -> None:
        allowed = RNN_PARAMS if data.get("arch") == "rnn" else CNN_PARAMS
        unknown = sorted(set(data.get("model") or {}) - allowed)
        if unknown:
            raise ValidationError(f"unknown {data.get('arch')} parameters {unknown}; allowed: {sorted(allowed)}", "model")
        target = data.get("target")
        if target is not None and not (isinstance(target, str) or
                                       (isinstance(target, list) and target and all(isinstance(t, str) for t in target))):
            raise ValidationError("target must be a column name or a list of column names", "target")


def check(spec: dict[str, Any], session, tenant_id: int) -> dict[str, Any]:  # noqa: ANN001
    """The dataset must exist for this tenant and fit the architecture, task and target."""
    from app.models import Dataset

    ds = session.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == tenant_id))
    if ds is None:
        raise SpecError(f"Dataset {spec['dataset_id']} not found", "unknown_dataset", {"spec": {"dataset_id": spec["dataset_id"]}})
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
            raise SpecError(f"unknown target column(s) {missing}; the dataset's label columns are {sorted(label_types)}",
                            details={"spec": {"target": sorted(label_types)}})
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


def route(spec: dict[str, Any], settings: Settings) -> str:
    if spec.get("queue"):
        return spec["queue"]
    return settings.gpu_queue if spec["device"].startswith("cuda") else settings.default_queue


# -- running -------------------------------------------------------------------------


def prepare_data(spec: dict[str, Any], dataset, store):  # noqa: ANN001, ANN201
    from workers.ml import data as mldata

    path = store.path(dataset.data_uri)
    split = dict(spec["split"] or {})
    if dataset.kind == "images":
        return mldata.load_image_npz(str(path), task=spec["task"], split=split or None, seed=spec["seed"],
                                     class_names=dataset.schema.get("classes") if isinstance(dataset.schema.get("classes"), list) else None)
    import pandas as pd

    frame = pd.read_parquet(path)
    return mldata.load_sequence_frame(
        frame, text_column="text", target_columns=spec["target"], task=spec["task"],
        tokenizer=spec["tokenizer"] or dataset.schema.get("tokenizer", "smiles"), split=split or None,
        seed=spec["seed"], max_len=spec["max_len"],
        canonicalize_smiles=False,  # ingestion already canonicalised and dropped invalid rows
    )


def model_params(spec: dict[str, Any], data) -> dict[str, Any]:  # noqa: ANN001
    params = dict(spec["model"])
    params["num_outputs"] = data.task.num_outputs
    if spec["arch"] == "rnn":
        params["vocab_size"] = data.tokenizer.vocab_size
    else:
        params["in_channels"] = data.input["channels"]
        params["image_size"] = list(data.input["size"])
    return params


def register_version(ctx, spec: dict[str, Any], dataset, bundle_url: str, metrics: dict, data) -> tuple[int, bool]:  # noqa: ANN001
    """A new version (max + 1 for this tenant and name), once per job even across retries."""
    from app.models import ModelVersion

    for _ in range(5):
        with ctx.db.session() as s:
            existing = s.scalar(select(ModelVersion).where(ModelVersion.job_id == ctx.job_id))
            if existing is not None:
                return existing.version, False
            latest = s.scalar(select(func.max(ModelVersion.version)).where(
                ModelVersion.tenant_id == ctx.tenant_id, ModelVersion.name == spec["model_name"]))
            version = (latest or 0) + 1
            s.add(ModelVersion(
                tenant_id=ctx.tenant_id, name=spec["model_name"], version=version, arch=spec["arch"],
                task=data.task.name, input_kind=data.input["kind"], spec=spec, dataset_id=dataset.id,
                dataset_sha256=dataset.sha256, metrics=metrics, artifact_uri=bundle_url, job_id=ctx.job_id,
            ))
            try:
                s.flush()
            except IntegrityError:  # a concurrent job took this number; try the next
                s.rollback()
                continue
            return version, True
    raise RuntimeError("could not allocate a model version")


def run(ctx, spec: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    import uuid

    from app.artifacts import ArtifactStore
    from app.models import Dataset
    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.models import build_model
    from workers.ml.training import TrainConfig, TrainingCancelled, fit, resolve_device, seed_everything
    from workers.runtime import JobCancelled

    store = ArtifactStore(ctx.settings.artifacts)
    with ctx.db.session() as s:
        dataset = s.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == ctx.tenant_id))
    if dataset is None:
        raise ValueError(f"dataset {spec['dataset_id']} no longer exists")
    ctx.progress(0.0, "loading data", force=True)
    data = prepare_data(spec, dataset, store)
    seed_everything(spec["seed"])  # same seed -> same initial weights -> same metrics
    model = build_model(spec["arch"], model_params(spec, data))
    cfg = TrainConfig(
        epochs=spec["epochs"], batch_size=spec["batch_size"], lr=spec["lr"], optimizer=spec["optimizer"],
        weight_decay=spec["weight_decay"], scheduler=spec["scheduler"], monitor=spec["monitor"],
        early_stopping_patience=spec["early_stopping_patience"], grad_clip=spec["grad_clip"], seed=spec["seed"],
        device=spec["device"], max_len=spec["max_len"],
    )
    device = resolve_device(cfg.device)
    ctx.log(f"training {spec['arch']} on {device} ({sum(p.numel() for p in model.parameters())} parameters)",
            device=str(device), rows=data.info)

    def on_epoch(epoch: int, metrics: dict) -> None:
        ctx.metric(**{"epoch": epoch, **metrics})

    def on_progress(fraction: float, message: str, eta_s: float | None) -> None:
        ctx.progress(fraction, message, eta_s=None if eta_s is None else round(eta_s, 1))

    started = time.monotonic()
    try:
        outcome = fit(model, data, cfg, checkpoint_path=ctx.job_dir() / "checkpoint.pt",
                      on_epoch=on_epoch, on_progress=on_progress, should_stop=ctx.should_stop)
    except TrainingCancelled:
        ctx.check_cancel()  # raises JobCancelled (or JobLost)
        raise JobCancelled()
    metrics = {"test": outcome.get("test"), "val": outcome.get("val"), "best_epoch": outcome.get("best_epoch"),
               "epochs_trained": outcome.get("epochs_trained")}
    bundle_dir = store.tenant_dir(ctx.tenant_id, "models", spec["model_name"], uuid.uuid4().hex)
    save_bundle(bundle_dir, model, bundle_config(model, data, metrics=metrics, train=spec, data_info=data.info))
    version, _created = register_version(ctx, spec, dataset, store.url(bundle_dir), metrics, data)
    return {
        "model": spec["model_name"], "version": version, "metrics": metrics,
        "epochs_trained": outcome.get("epochs_trained"), "best_epoch": outcome.get("best_epoch"),
        "stopped_early": outcome.get("stopped_early"), "device": str(device), "data": data.info,
        "train_seconds": round(time.monotonic() - started, 3),
    }


register(JobKind("train", TrainSpec, run, route, "train a CNN or RNN and register a model version", check=check))
