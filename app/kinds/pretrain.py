"""`pretrain`: train an RNN as a SMILES language model (next token, teacher forcing) on a
library or a SMILES sequences dataset, and register it as a model version with task
`language_model`. A `train` spec's `init_from: "name@version"` starts from it. Predict and
score refuse such a version (it has no prediction head). The run is workers/kinds/pretrain.py."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import select

from app.config import Settings
from app.fields import StrictFloat, StrictInteger
from app.kinds import KindSpec, Spec, SpecError, SubmitContext, allowed_queue, queue_or_default, register
from app.kinds.ingest import require_ready
from app.kinds.train import MODEL_NAME, limits
from app.modelconfig import RNNConfig, check_params, over_budget, over_limits
from app.models import MAX_ID, Dataset
from app.workers_registry import gpu_worker_check

LM_PARAMS = ("cell", "embedding_dim", "hidden_size", "num_layers", "dropout")  # workers/ml/lm.py
VAL_FRACTION = 0.05  # held out for validation perplexity (at least one molecule)


class PretrainSpec(Schema):
    model_name = fields.String(required=True, validate=MODEL_NAME)
    dataset_id = StrictInteger(
        required=True,
        validate=validate.Range(min=1, max=MAX_ID),
        metadata={"description": "a library, or a sequences dataset of SMILES"},
    )
    epochs = StrictInteger(load_default=5, validate=validate.Range(min=1, max=10_000))
    batch_size = StrictInteger(load_default=128, validate=validate.Range(min=1, max=65_536))
    lr = StrictFloat(load_default=1e-3, validate=validate.Range(min=0, min_inclusive=False, max=10))
    max_rows = StrictInteger(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=16),
        metadata={"description": "read at most this many molecules (default: the server's cap)"},
    )
    max_len = StrictInteger(load_default=128, validate=validate.Range(min=8, max=10_000))
    model = fields.Dict(
        load_default=dict, metadata={"description": "cell, embedding_dim, hidden_size, num_layers, dropout"}
    )
    seed = StrictInteger(load_default=0)
    grad_clip = StrictFloat(load_default=1.0, allow_none=True, validate=validate.Range(min=0, min_inclusive=False))
    device = fields.String(load_default="auto", validate=validate.Regexp(r"^(auto|cpu|cuda(:\d+)?)$"))
    queue = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def _model_params(self, data: dict[str, Any], **_kw: Any) -> None:
        params = data.get("model") or {}
        unknown = sorted(set(params) - set(LM_PARAMS))
        errors = {k: [f"not a language-model parameter; allowed: {list(LM_PARAMS)}"] for k in unknown}
        errors.update(check_params("rnn", {k: v for k, v in params.items() if k in LM_PARAMS}))
        if errors:
            raise ValidationError({"model": errors})


def full_params(params: dict[str, Any]) -> dict[str, Any]:
    """Every LM parameter, defaults filled in, so the version's spec states the model's shape
    (a fine-tune's submit check compares against it)."""
    defaults = RNNConfig(vocab_size=2)
    return {k: params.get(k, getattr(defaults, k)) for k in LM_PARAMS}


def check(spec: Spec, ctx: SubmitContext) -> Spec:
    """Within the server's limits; the dataset is the tenant's library or SMILES sequences."""
    bounds = limits(ctx.settings)
    over = over_limits(spec, bounds)
    cap = ctx.settings.max_pretrain_rows
    if spec["max_rows"] is not None and spec["max_rows"] > cap:
        over["max_rows"] = [f"at most {cap} on this server, got {spec['max_rows']}"]
    if over:
        raise SpecError(
            "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in over.items()), "over_limit", {"spec": over}
        )
    ds = ctx.session.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == ctx.tenant_id))
    if ds is None:
        raise SpecError(
            f"Dataset {spec['dataset_id']} not found", "unknown_dataset", {"spec": {"dataset_id": spec["dataset_id"]}}
        )
    require_ready(ds, "dataset_id")
    if ds.kind not in ("library", "sequences") or (
        ds.kind == "sequences" and ds.schema.get("tokenizer", "smiles") != "smiles"
    ):
        message = f"pretrain reads SMILES from a library or a SMILES sequences dataset; dataset {ds.id} holds {ds.kind}"
        if ds.kind == "sequences":
            message += " of tokens"
        raise SpecError(message, "invalid_spec", {"spec": {"dataset_id": [message]}})
    rows = min(int(ds.rows or 0), spec["max_rows"] or cap)
    if rows < 16:
        message = f"dataset {ds.id} has {rows} molecules; a language model needs at least 16"
        raise SpecError(message, "too_few_rows", {"spec": {"dataset_id": [message]}})
    budget = over_budget(spec["epochs"], rows, bounds)
    if budget:
        raise SpecError(budget, "over_limit", {"spec": {"epochs": [budget]}})
    note = gpu_worker_check(spec, ctx)
    out = {**spec, "model": full_params(spec["model"]), "max_rows": rows, "dataset_sha256": ds.sha256}
    if note:
        out["notes"] = [note]
    return out


def route(spec: Spec, settings: Settings) -> str:
    default = settings.gpu_queue if spec["device"].startswith("cuda") else settings.default_queue
    return allowed_queue("pretrain", queue_or_default(spec, default), settings)


def queues(settings: Settings) -> tuple[str, ...]:
    return (settings.default_queue, settings.gpu_queue)


register(
    KindSpec(
        "pretrain",
        PretrainSpec,
        route,
        "train an RNN SMILES language model that train specs can start from (init_from)",
        check=check,
        queues=queues,
    )
)
