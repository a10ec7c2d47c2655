"""`train`: fit a CNN (images) or RNN (SMILES / token sequences) on an uploaded dataset
(spec, submit-time check, route). The run is workers/kinds/train.py: it checkpoints every
epoch and registers the result as a new model version.

`ensemble: N` trains N members (seed + i) as units of work any worker on the queue takes;
`augment: {"random_smiles": n}` adds n random SMILES of each training molecule per epoch;
`init_from: "name@version"` starts an RNN from a `pretrain` language model (its embedding,
recurrent weights and vocabulary); `devices: N` trains with DistributedDataParallel on N
devices of one worker (workers/ml/distributed.py), batch_size being the global batch."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema
from sqlalchemy import select

from app.config import Settings
from app.fields import StrictFloat, StrictInteger
from app.kinds import KindSpec, Spec, SpecError, SubmitContext, allowed_queue, queue_or_default, register
from app.kinds.ingest import require_ready
from app.modelconfig import (
    CONFIGS,
    DEFAULT_FRACTIONS,
    ConfigError,
    TrainLimits,
    carved_sizes,
    check_params,
    over_budget,
    over_limits,
    pretrained_conflicts,
    resolve_split,
    too_few_rows,
    user_params,
    with_pretrained,
)
from app.models import MAX_ID, Dataset
from app.registry import ModelNotFound, resolve_ref
from app.workers_registry import gpu_worker_check

MAX_DEVICES = 8  # DistributedDataParallel ranks on one worker (workers/ml/distributed.py)
MODEL_NAME = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", error="letters, digits, '.', '_', '-' (max 128)")
RNN_PARAMS = user_params("rnn")  # cell, embedding_dim, hidden_size, num_layers, bidirectional, dropout
CNN_PARAMS = user_params("cnn")  # channels, kernel_size, hidden, dropout, batch_norm, pool_to


class SplitSpec(Schema):
    train = StrictFloat(metadata={"description": "default: 1 - val - test"})
    val = StrictFloat(metadata={"description": "in [0, 1); default 0.1 (or the rest when train is given)"})
    test = StrictFloat(metadata={"description": "in [0, 1); default 0.1 (or the rest when train is given)"})
    method = fields.String(load_default="random", validate=validate.OneOf(["random", "scaffold"]))

    @validates_schema
    def _fractions(self, data: dict[str, Any], **_kw: Any) -> None:
        try:
            resolve_split(data)
        except ConfigError as exc:
            raise ValidationError(exc.errors) from exc

    @post_load
    def _complete(self, data: dict[str, Any], **_kw: Any) -> dict[str, Any]:
        """Every fraction filled in, so the stored spec says exactly what the worker does."""
        return {**resolve_split(data), "method": data["method"]}


class AugmentSpec(Schema):
    random_smiles = StrictInteger(
        load_default=0,
        validate=validate.Range(min=0, max=20),
        metadata={"description": "random SMILES per training molecule per epoch (SMILES datasets only)"},
    )


CARD_TEXT = validate.Length(max=10_000)


class CardSpec(Schema):
    """The written parts of the model card (app/cards.py); editable later."""

    intended_use = fields.String(validate=CARD_TEXT, metadata={"description": "what the model is for"})
    out_of_scope = fields.String(validate=CARD_TEXT, metadata={"description": "uses it is not for"})
    limitations = fields.String(validate=CARD_TEXT, metadata={"description": "known limitations"})


LANGUAGE_MODEL = "language_model"  # ModelVersion.task of a `pretrain` version


class TrainSpec(Schema):
    model_name = fields.String(required=True, validate=MODEL_NAME)
    dataset_id = StrictInteger(required=True, validate=validate.Range(min=1, max=MAX_ID))
    arch = fields.String(required=True, validate=validate.OneOf(["cnn", "rnn"]))
    task = fields.String(
        load_default="classification", validate=validate.OneOf(["classification", "multilabel", "regression"])
    )
    target = fields.Raw(load_default=None, metadata={"description": "label column, or a list of columns"})
    model = fields.Dict(load_default=dict, metadata={"description": "architecture hyper-parameters"})
    epochs = StrictInteger(load_default=10, validate=validate.Range(min=1, max=10_000))
    batch_size = StrictInteger(load_default=64, validate=validate.Range(min=1, max=65_536))
    lr = StrictFloat(load_default=1e-3, validate=validate.Range(min=0, min_inclusive=False, max=10))
    optimizer = fields.String(load_default="adamw", validate=validate.OneOf(["adam", "adamw", "sgd"]))
    weight_decay = StrictFloat(load_default=0.0, validate=validate.Range(min=0))
    scheduler = fields.String(load_default="none", validate=validate.OneOf(["none", "cosine", "step", "plateau"]))
    early_stopping_patience = StrictInteger(load_default=None, allow_none=True, validate=validate.Range(min=1))
    monitor = fields.String(load_default="loss")
    grad_clip = StrictFloat(load_default=None, allow_none=True, validate=validate.Range(min=0, min_inclusive=False))
    seed = StrictInteger(load_default=0)
    split = fields.Nested(SplitSpec, load_default=None, allow_none=True)
    device = fields.String(load_default="auto", validate=validate.Regexp(r"^(auto|cpu|cuda(:\d+)?)$"))
    max_len = StrictInteger(load_default=256, validate=validate.Range(min=8, max=10_000))
    tokenizer = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(["smiles", "whitespace"]))
    queue = fields.String(load_default=None, allow_none=True)
    ensemble = StrictInteger(
        load_default=1,
        validate=validate.Range(min=1, max=10),
        metadata={"description": "members trained with seeds seed..seed+N-1, registered as one version"},
    )
    devices = StrictInteger(
        load_default=1,
        validate=validate.Range(min=1, max=MAX_DEVICES),
        metadata={
            "description": "train with DistributedDataParallel on this many devices of one worker (GPUs "
            "cuda:0..N-1, or N CPU processes); batch_size is the global batch, split across them"
        },
    )
    augment = fields.Nested(AugmentSpec, load_default=None, allow_none=True)
    init_from = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "a pretrain version (name@version) to start the RNN from"},
    )
    coverage = StrictFloat(
        load_default=0.9,
        validate=validate.Range(min=0.5, max=0.99),
        metadata={"description": "coverage of the calibration metrics reported on the test split"},
    )
    explain_faithfulness = fields.Boolean(
        load_default=True, metadata={"description": "measure attribution faithfulness after fit (SMILES, images)"}
    )
    card = fields.Nested(
        CardSpec,
        load_default=None,
        allow_none=True,
        metadata={"description": "the model card's intended use, out-of-scope use and limitations"},
    )

    @validates_schema
    def _model_params(self, data: dict[str, Any], **_kw: Any) -> None:
        errors: dict[str, Any] = {}
        arch = data.get("arch")
        if arch in CONFIGS:  # an unknown arch is reported on its own field
            # The same validation the worker's model build runs (app/modelconfig.py).
            model_errors = check_params(arch, data.get("model") or {})
            if model_errors:
                errors["model"] = model_errors
        target = data.get("target")
        if target is not None and not (
            isinstance(target, str) or (isinstance(target, list) and target and all(isinstance(t, str) for t in target))
        ):
            errors["target"] = ["target must be a column name or a list of column names"]
        if arch == "cnn" and data.get("init_from"):
            errors["init_from"] = ["init_from starts an RNN from a SMILES language model; arch cnn cannot use it"]
        if arch == "cnn" and (data.get("augment") or {}).get("random_smiles"):
            errors["augment"] = ["random-SMILES augmentation needs SMILES data; arch cnn trains on images"]
        devices_problem = _devices_problem(data)
        if devices_problem:
            errors["devices"] = [devices_problem]
        if errors:
            raise ValidationError(errors)


def _devices_problem(data: dict[str, Any]) -> str | None:
    """Why `devices` does not fit the rest of the spec, or None."""
    devices, batch_size = data.get("devices", 1), data.get("batch_size", 64)
    if not isinstance(devices, int) or devices <= 1:
        return None
    if (data.get("ensemble") or 1) > 1:
        return f"devices {devices} with ensemble {data['ensemble']} is not supported; use one of them"
    if isinstance(batch_size, int) and batch_size % devices:
        return (
            f"batch_size {batch_size} is the global batch, split across the {devices} devices: "
            f"it must be a multiple of devices (e.g. {max(devices, batch_size - batch_size % devices)})"
        )
    return None


def limits(settings: Settings) -> TrainLimits:
    return TrainLimits(
        settings.max_epochs,
        settings.max_batch_size,
        settings.max_max_len,
        settings.max_epoch_rows,
        settings.max_ensemble,
    )


def _field_error(field: str, message: str, code: str = "invalid_spec") -> SpecError:
    return SpecError(f"{field}: {message}", code, {"spec": {field: [message]}})


def check_init_from(spec: Spec, ctx: SubmitContext, ds: Dataset) -> Spec:
    """init_from must name a language model of this tenant whose shape the spec's `model`
    does not contradict, on a SMILES dataset; the spec gets the version's id and the
    pretrained shape filled into `model`."""
    ref = spec["init_from"]
    if ds.kind != "sequences" or (spec["tokenizer"] or ds.schema.get("tokenizer", "smiles")) != "smiles":
        raise _field_error("init_from", "a pretrained SMILES language model needs a SMILES dataset")
    try:
        mv = resolve_ref(ctx.session, ctx.tenant_id, ref)
    except ModelNotFound as exc:
        raise _field_error("init_from", str(exc), "unknown_model") from exc
    if mv.task != LANGUAGE_MODEL:
        raise _field_error("init_from", f"model {mv.name} v{mv.version} is a {mv.task} model, not a language model")
    pretrained = dict(mv.spec.get("model") or {})
    conflicts = pretrained_conflicts(pretrained, spec["model"])
    if conflicts:
        message = "; ".join(f"{k}: {' '.join(v)}" for k, v in conflicts.items())
        raise SpecError(f"init_from: {message}", "invalid_spec", {"spec": {"init_from": [message], "model": conflicts}})
    return {
        **spec,
        "model": with_pretrained(pretrained, spec["model"]),
        "init_from_model_version_id": mv.id,
        "init_from_version": f"{mv.name}@{mv.version}",
    }


def check(spec: Spec, ctx: SubmitContext) -> Spec:
    """Within the server's limits (epochs, batch_size, max_len, epochs x training rows); the
    dataset must exist for this tenant and fit the architecture, task and target, with rows
    enough for the split; device cuda needs a live GPU worker."""
    session, tenant_id = ctx.session, ctx.tenant_id
    bounds = limits(ctx.settings)
    over = over_limits(spec, bounds)
    if over:
        raise SpecError(
            "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in over.items()), "over_limit", {"spec": over}
        )
    ds = session.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == tenant_id))
    if ds is None:
        raise SpecError(
            f"Dataset {spec['dataset_id']} not found", "unknown_dataset", {"spec": {"dataset_id": spec["dataset_id"]}}
        )
    require_ready(ds, "dataset_id")
    wanted = {"cnn": "images", "rnn": "sequences"}[spec["arch"]]
    if ds.kind != wanted:
        raise SpecError(f"arch {spec['arch']} trains on {wanted} datasets; dataset {ds.id} holds {ds.kind}")
    random_smiles = (spec.get("augment") or {}).get("random_smiles", 0)
    if random_smiles and (spec["tokenizer"] or ds.schema.get("tokenizer", "smiles")) != "smiles":
        raise _field_error(
            "augment", f"random-SMILES augmentation needs a SMILES dataset; dataset {ds.id} holds tokens"
        )
    if spec.get("init_from"):
        spec = check_init_from(spec, ctx, ds)
    split = spec["split"] or {**DEFAULT_FRACTIONS, "method": "random"}
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
        if spec["task"] == "classification":
            _check_class_target(ds, targets[0], label_types[targets[0]])
        spec = {**spec, "target": targets if len(targets) > 1 else targets[0]}
        labelled = _labelled_rows(ds, targets)
        problem = too_few_rows(labelled, split)
        train_rows = carved_sizes(labelled, split)["train"]
    else:
        if spec["task"] == "regression" and ds.schema.get("label_kind") not in (None, "regression", "float"):
            raise SpecError(
                "this image dataset has class labels; use task classification or multilabel", "invalid_labels"
            )
        if spec["task"] == "classification" and ds.schema.get("label_kind") != "multilabel":
            counts = (ds.stats.get("label_counts") or {}).get("train") or {}
            present = [name for name, n in counts.items() if n]
            if counts and len(present) < 2:
                message = (
                    f"the training images hold one class only ({', '.join(present) or 'none'}); "
                    "classification needs at least two"
                )
                raise SpecError(message, "invalid_labels", {"spec": {"task": [message]}})
        given = ds.schema.get("splits") or {"train": ds.rows}
        carve = [k for k in ("val", "test") if not given.get(k)]
        problem = too_few_rows(int(given.get("train", 0)), split, carve)
        train_rows = carved_sizes(int(given.get("train", 0)), split, carve)["train"]
    if problem:
        raise SpecError(problem, "too_few_rows", {"spec": {"dataset_id": [problem]}})
    budget = over_budget(
        spec["epochs"], train_rows, bounds, members=spec.get("ensemble", 1), random_smiles=random_smiles
    )
    if budget:
        raise SpecError(budget, "over_limit", {"spec": {"epochs": [budget]}})
    note = gpu_worker_check(spec, ctx)  # 422 naming `device` when no GPU worker is connected
    out = {**spec, "split": split, "dataset_sha256": ds.sha256}
    if note:
        out["notes"] = [note]
    return out


def _check_class_target(ds: Dataset, target: str, label_type: str) -> None:
    """Classification needs a categorical target with at least two classes."""
    summary = (ds.stats.get("labels") or {}).get(target) or {}
    if label_type == "float":
        distinct = summary.get("distinct")
        if distinct is not None:
            what = f"{distinct} distinct values"
        elif summary.get("count") is not None and summary.get("min") is not None:
            what = f"{summary['count']} numbers from {summary['min']:g} to {summary['max']:g}"
        else:
            what = "numbers"
        message = (
            f"target {target!r} holds continuous values ({what}); use task regression "
            "(to train a classifier, upload it with whole-number or text class labels)"
        )
        raise SpecError(message, "invalid_labels", {"spec": {"task": [message]}})
    classes = (ds.schema.get("classes") or {}).get(target)
    if classes is not None and len(classes) < 2:
        message = (
            f"target {target!r} holds one class only ({', '.join(map(str, classes)) or 'none'}); "
            "classification needs at least two"
        )
        raise SpecError(message, "invalid_labels", {"spec": {"target": [message]}})


def _labelled_rows(ds: Dataset, targets: list[str]) -> int:
    """Rows with a value in at least one target column (at least the largest per-column
    count; the dataset's row count when the stats do not say)."""
    labels = ds.stats.get("labels") or {}
    counts = [labels[t]["count"] for t in targets if isinstance(labels.get(t), dict) and "count" in labels[t]]
    return max(counts) if counts else ds.rows


def route(spec: Spec, settings: Settings) -> str:
    default = settings.gpu_queue if spec["device"].startswith("cuda") else settings.default_queue
    return allowed_queue("train", queue_or_default(spec, default), settings)


def queues(settings: Settings) -> tuple[str, ...]:
    return (settings.default_queue, settings.gpu_queue)


register(
    KindSpec("train", TrainSpec, route, "train a CNN or RNN and register a model version", check=check, queues=queues)
)
