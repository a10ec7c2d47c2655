"""Runs `pretrain` (spec: app/kinds/pretrain.py): read up to max_rows SMILES of a library
(canonicalised here) or of a SMILES sequences dataset (canonical since ingestion), train the
language model of workers/ml/lm.py with a checkpoint every epoch, and register it as a model
version with task `language_model`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from app.artifacts import ArtifactStore, open_read
from app.chem import canonical_smiles
from app.kinds import Spec
from app.kinds.pretrain import VAL_FRACTION
from app.models import Dataset
from workers.kinds import JobResult
from workers.kinds.train import load_dataset, register_version
from workers.runtime import JobCancelled, JobContext


def library_smiles(ctx: JobContext, dataset: Dataset, store: ArtifactStore, max_rows: int) -> Iterator[str]:
    from app.ingest import IngestLimits, iter_library_rows
    from app.ingest.library import library_schema

    schema = library_schema(dataset.schema, None, None)
    limits = IngestLimits(max_bytes=ctx.settings.archive_max_bytes)
    for _row, _ident, text in iter_library_rows(str(store.path(dataset.uri)), schema, 0, max_rows, limits=limits):
        yield text


def sequence_smiles(dataset: Dataset, store: ArtifactStore, max_rows: int) -> list[str]:
    import pandas as pd

    if dataset.data_uri is None:
        raise ValueError(f"dataset {dataset.id} has no sequences")
    with open_read(store.path(dataset.data_uri)) as fh:
        frame = pd.read_parquet(fh, columns=["text"])
    return frame["text"].astype("string").fillna("").head(max_rows).tolist()


def read_molecules(ctx: JobContext, dataset: Dataset, store: ArtifactStore, max_rows: int) -> tuple[list[str], int]:
    """(canonical SMILES, invalid rows): libraries are canonicalised with RDKit here."""
    if dataset.kind == "sequences":
        texts = [t for t in sequence_smiles(dataset, store, max_rows) if t]
        return texts, 0
    out: list[str] = []
    invalid = 0
    for i, text in enumerate(library_smiles(ctx, dataset, store, max_rows)):
        canon, _err = canonical_smiles(text)
        if canon is None:
            invalid += 1
        else:
            out.append(canon)
        if i % 5000 == 0:
            ctx.check_cancel()
            ctx.progress(0.05 * i / max_rows, f"reading molecules: {i:,}/{max_rows:,}")
    return out, invalid


def run(ctx: JobContext, spec: Spec) -> JobResult:
    from workers.ml.lm import LM_TASK, LMSequences, SmilesLM, fit_lm, fit_vocabulary, lm_config, save_lm_bundle
    from workers.ml.lm import too_long as too_long_rows
    from workers.ml.training import TrainConfig, TrainingCancelled, resolve_device

    store = ArtifactStore.from_settings(ctx.settings)
    dataset = load_dataset(ctx, spec)
    ctx.progress(0.0, "reading molecules", force=True)
    smiles, invalid = read_molecules(ctx, dataset, store, int(spec["max_rows"]))
    order = np.random.default_rng(spec["seed"]).permutation(len(smiles))
    n_val = max(1, round(len(smiles) * VAL_FRACTION))
    val_smiles = [smiles[i] for i in np.sort(order[:n_val])]
    train_smiles = [smiles[i] for i in np.sort(order[n_val:])]
    if len(train_smiles) < 8:
        raise ValueError(f"{len(smiles)} valid molecules are too few to train a language model")
    tokenizer = fit_vocabulary(train_smiles, spec["seed"], spec["max_len"])
    keep_train = ~too_long_rows(train_smiles, tokenizer, spec["max_len"])
    keep_val = ~too_long_rows(val_smiles, tokenizer, spec["max_len"])
    train = LMSequences([s for s, k in zip(train_smiles, keep_train, strict=True) if k], tokenizer, spec["max_len"])
    val = LMSequences([s for s, k in zip(val_smiles, keep_val, strict=True) if k], tokenizer, spec["max_len"])
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"every molecule is longer than max_len {spec['max_len']} tokens")
    info: dict[str, Any] = {
        "rows": {"train": len(train), "val": len(val)},
        "invalid_rows": invalid,
        "too_long_rows": int((~keep_train).sum() + (~keep_val).sum()),
        "vocab_size": tokenizer.vocab_size,
    }
    cfg = TrainConfig(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        grad_clip=spec.get("grad_clip"),
        seed=spec["seed"],
        device=spec["device"],
        max_len=spec["max_len"],
    )
    device = resolve_device(cfg.device)
    model = SmilesLM(lm_config({"vocab_size": tokenizer.vocab_size, **spec["model"]}))
    ctx.log(
        f"pretraining a SMILES language model on {device} ({sum(p.numel() for p in model.parameters())} parameters)",
        device=str(device),
        data=info,
    )
    started = time.monotonic()
    try:
        outcome = fit_lm(
            model,
            train,
            val,
            cfg,
            checkpoint_path=ctx.job_dir() / "checkpoint.pt",
            on_epoch=lambda epoch, metrics: ctx.metric(**{**metrics, "epoch": epoch}),
            on_progress=lambda fraction, message: ctx.progress(0.05 + 0.94 * fraction, message),
            should_stop=ctx.should_stop,
        )
    except TrainingCancelled:
        ctx.check_cancel()
        raise JobCancelled() from None
    val_metrics = outcome["val"]
    metrics = {
        "val_perplexity": val_metrics["perplexity"],
        "val_loss": val_metrics["loss"],
        "val_token_accuracy": val_metrics["token_accuracy"],
        "best_epoch": outcome["best_epoch"],
        "epochs_trained": outcome["epochs_trained"],
        "data": info,
    }
    bundle_dir = store.tenant_dir(ctx.tenant_id, "models", spec["model_name"], uuid.uuid4().hex)
    save_lm_bundle(bundle_dir, model.cpu(), tokenizer, metrics=metrics, train=spec, data_info=info)
    version, _created = register_version(
        ctx, spec, dataset, store.url(bundle_dir), metrics, task=LM_TASK, input_kind="smiles", arch="rnn"
    )
    return {
        "model": spec["model_name"],
        "version": version,
        "metrics": metrics,
        "device": str(device),
        "data": info,
        "train_seconds": round(time.monotonic() - started, 3),
    }
