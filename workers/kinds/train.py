"""Runs `train` (spec: app/kinds/train.py): fit a CNN (images) or RNN (SMILES / token
sequences), checkpointing every epoch, and register the result as a new model version."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.artifacts import ArtifactStore, open_read
from app.kinds import Spec
from app.modelconfig import resolve_split
from app.models import Dataset, ModelVersion
from workers.kinds import JobResult
from workers.runtime import JobContext

if TYPE_CHECKING:
    from workers.ml.data import PreparedData

log = logging.getLogger(__name__)


def prepare_data(spec: Spec, dataset: Dataset, store: ArtifactStore) -> PreparedData:
    from workers.ml import data as mldata

    if dataset.data_uri is None:  # only libraries lack normalised data; the spec check rejects them
        raise ValueError(f"dataset {dataset.id} is a {dataset.kind} dataset without training data")
    path = store.path(dataset.data_uri)
    # Complete fractions (the submit check stores them so; older specs may omit some).
    given = dict(spec.get("split") or {})
    split = {**resolve_split(given), "method": given.get("method", "random")}
    if dataset.kind == "images":
        with open_read(path) as fh:
            return mldata.load_image_npz(
                fh,
                task=spec["task"],
                split=split,
                seed=spec["seed"],
                class_names=dataset.schema.get("classes") if isinstance(dataset.schema.get("classes"), list) else None,
            )
    import pandas as pd

    with open_read(path) as fh:
        frame = pd.read_parquet(fh)
    return mldata.load_sequence_frame(
        frame,
        text_column="text",
        target_columns=spec["target"],
        task=spec["task"],
        tokenizer=spec["tokenizer"] or dataset.schema.get("tokenizer", "smiles"),
        split=split,
        seed=spec["seed"],
        max_len=spec["max_len"],
        canonicalize_smiles=False,  # ingestion already canonicalised and dropped invalid rows
    )


def model_params(spec: Spec, data: PreparedData) -> dict[str, Any]:
    params = dict(spec["model"])
    params["num_outputs"] = data.head.num_outputs
    if spec["arch"] == "rnn":
        if data.tokenizer is None:  # the spec check pairs rnn with sequence datasets
            raise ValueError("an rnn needs sequence data with a tokenizer")
        params["vocab_size"] = data.tokenizer.vocab_size
    else:
        params["in_channels"] = data.input["channels"]
        params["image_size"] = list(data.input["size"])
    return params


def register_version(
    ctx: JobContext, spec: Spec, dataset: Dataset, bundle_url: str, metrics: dict[str, Any], data: PreparedData
) -> tuple[int, bool]:
    """A new version (max + 1 for this tenant and name), once per job even across retries."""
    for _ in range(5):
        with ctx.db.session() as s:
            existing = s.scalar(select(ModelVersion).where(ModelVersion.job_id == ctx.job_id))
            if existing is not None:
                return existing.version, False
            latest = s.scalar(
                select(func.max(ModelVersion.version)).where(
                    ModelVersion.tenant_id == ctx.tenant_id, ModelVersion.name == spec["model_name"]
                )
            )
            version = (latest or 0) + 1
            s.add(
                ModelVersion(
                    tenant_id=ctx.tenant_id,
                    name=spec["model_name"],
                    version=version,
                    arch=spec["arch"],
                    task=data.head.name,
                    input_kind=data.input["kind"],
                    spec=spec,
                    dataset_id=dataset.id,
                    dataset_sha256=dataset.sha256,
                    metrics=metrics,
                    artifact_uri=bundle_url,
                    job_id=ctx.job_id,
                )
            )
            try:
                s.flush()
            except IntegrityError:  # a concurrent job took this number; try the next
                s.rollback()
                continue
            return version, True
    raise RuntimeError("could not allocate a model version")


def run(ctx: JobContext, spec: Spec) -> JobResult:
    import uuid

    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.models import build_model
    from workers.ml.training import TrainConfig, TrainingCancelled, fit, resolve_device, seed_everything
    from workers.runtime import JobCancelled

    store = ArtifactStore.from_settings(ctx.settings)
    with ctx.db.session() as s:
        dataset = s.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == ctx.tenant_id))
    if dataset is None:
        raise ValueError(f"dataset {spec['dataset_id']} no longer exists")
    ctx.progress(0.0, "loading data", force=True)
    data = prepare_data(spec, dataset, store)
    seed_everything(spec["seed"])  # same seed -> same initial weights -> same metrics
    model = build_model(spec["arch"], model_params(spec, data))
    cfg = TrainConfig(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        optimizer=spec["optimizer"],
        weight_decay=spec["weight_decay"],
        scheduler=spec["scheduler"],
        monitor=spec["monitor"],
        early_stopping_patience=spec["early_stopping_patience"],
        grad_clip=spec["grad_clip"],
        seed=spec["seed"],
        device=spec["device"],
        max_len=spec["max_len"],
    )
    device = resolve_device(cfg.device)
    ctx.log(
        f"training {spec['arch']} on {device} ({sum(p.numel() for p in model.parameters())} parameters)",
        device=str(device),
        rows=data.info,
    )

    def on_epoch(epoch: int, metrics: dict) -> None:
        ctx.metric(**{"epoch": epoch, **metrics})

    def on_progress(fraction: float, message: str, eta_s: float | None) -> None:
        ctx.progress(fraction, message, eta_s=None if eta_s is None else round(eta_s, 1))

    started = time.monotonic()
    try:
        outcome = fit(
            model,
            data,
            cfg,
            checkpoint_path=ctx.job_dir() / "checkpoint.pt",
            on_epoch=on_epoch,
            on_progress=on_progress,
            should_stop=ctx.should_stop,
        )
    except TrainingCancelled:
        ctx.check_cancel()  # raises JobCancelled (or JobLost)
        raise JobCancelled() from None
    metrics = {
        "test": outcome.get("test"),
        "val": outcome.get("val"),
        "best_epoch": outcome.get("best_epoch"),
        "epochs_trained": outcome.get("epochs_trained"),
    }
    bundle_dir = store.tenant_dir(ctx.tenant_id, "models", spec["model_name"], uuid.uuid4().hex)
    save_bundle(bundle_dir, model, bundle_config(model, data, metrics=metrics, train=spec, data_info=data.info))
    version, _created = register_version(ctx, spec, dataset, store.url(bundle_dir), metrics, data)
    return {
        "model": spec["model_name"],
        "version": version,
        "metrics": metrics,
        "epochs_trained": outcome.get("epochs_trained"),
        "best_epoch": outcome.get("best_epoch"),
        "stopped_early": outcome.get("stopped_early"),
        "device": str(device),
        "data": data.info,
        "train_seconds": round(time.monotonic() - started, 3),
    }
