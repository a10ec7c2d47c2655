"""Runs `train` (spec: app/kinds/train.py): fit a CNN (images) or RNN (SMILES / token
sequences), checkpointing every epoch, then package it (calibration, applicability domain,
attribution faithfulness: workers/ml/quality.py, workers/ml/explain.py) and register the
result as a new model version.

`ensemble: N` (N > 1) trains N members as units of work on the scoring-shard lease
(app/leases.py SHARDS; one ScoreShard row per member, index = member): any worker on the
job's queue takes one through the shard task (workers/tasks.py) and the parent job takes
them too, so one worker trains them in turn and every extra worker trains some in parallel.
Member i draws its initial weights, batch order and random SMILES from seed + i, checkpoints
every epoch in the job's directory (a member resumes there after its worker died) and leaves
its weights there as safetensors; the parent then loads them into one Ensemble, packages it
and registers one version. See `run_ensemble` and `train_member`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.artifacts import ArtifactStore, open_read
from app.config import Settings
from app.kinds import Spec
from app.modelconfig import resolve_split
from app.models import Dataset, ModelVersion
from workers.kinds import JobResult
from workers.runtime import JobContext
from workers.units import UnitJob, claim_for_message, interrupted, release_failed, run_unit_job

if TYPE_CHECKING:
    import torch
    from sqlalchemy.orm import Session
    from torch import nn

    from workers.ml.data import PreparedData
    from workers.ml.tokenizers import Tokenizer
    from workers.ml.training import TrainConfig
    from workers.scoring.shards import Claim

log = logging.getLogger(__name__)


def random_smiles_of(spec: Spec) -> int:
    return int((spec.get("augment") or {}).get("random_smiles", 0))


def pretrained_dir(db: Any, store: ArtifactStore, spec: Spec, tenant_id: int) -> Path | None:
    """The bundle directory of the `init_from` language model (resolved at submit), or None."""
    version_id = spec.get("init_from_model_version_id")
    if not spec.get("init_from") or version_id is None:
        return None
    with db.session() as s:
        mv = s.get(ModelVersion, version_id)
        uri = mv.artifact_uri if mv is not None and mv.tenant_id == tenant_id else None
    if uri is None:
        raise ValueError(f"the pretrained model {spec['init_from']} no longer exists")
    return store.path(uri)


def pretrained_tokenizer(directory: Path | None) -> Tokenizer | None:
    if directory is None:
        return None
    from workers.ml.lm import read_lm_config
    from workers.ml.tokenizers import Tokenizer

    return Tokenizer.from_dict(read_lm_config(directory)["tokenizer"])


def prepare_data(
    spec: Spec,
    dataset: Dataset,
    store: ArtifactStore,
    *,
    augment_seed: int | None = None,
    vocabulary: Tokenizer | None = None,
) -> PreparedData:
    """The job's data: the split and the vocabulary depend on the spec's seed only (every
    ensemble member sees the same ones); `augment_seed` picks the random-SMILES stream."""
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
        augment=random_smiles_of(spec),
        augment_seed=augment_seed,
        vocabulary=vocabulary,
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


def build_member(spec: Spec, data: PreparedData, seed: int, pretrained: Path | None) -> nn.Module:
    """A fresh model drawn with `seed` (same seed -> same initial weights), its embedding and
    recurrent weights copied from the pretrained language model when init_from names one."""
    from workers.ml.models import build_model
    from workers.ml.training import seed_everything

    seed_everything(seed)
    model = build_model(spec["arch"], model_params(spec, data))
    if pretrained is not None:
        from workers.ml.lm import load_encoder

        load_encoder(model, pretrained)
    return model


def train_config(spec: Spec, seed: int) -> TrainConfig:
    from workers.ml.training import TrainConfig

    return TrainConfig(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        optimizer=spec["optimizer"],
        weight_decay=spec["weight_decay"],
        scheduler=spec["scheduler"],
        monitor=spec["monitor"],
        early_stopping_patience=spec["early_stopping_patience"],
        grad_clip=spec["grad_clip"],
        seed=seed,
        device=spec["device"],
        max_len=spec["max_len"],
    )


def fit_summary(outcome: dict[str, Any]) -> dict[str, Any]:
    return {k: outcome.get(k) for k in ("test", "val", "best_epoch", "epochs_trained")}


def fence_registration(session: Session, ctx: JobContext) -> None:
    """Only the attempt that owns the job registers its version: lock the job row while it is
    `running` at ctx.attempt (two attempts of one job then register one after the other), or
    raise JobLost. An attempt cut off from the database while it packaged, and taken over
    meanwhile, registered its version when the link returned (found by the chaos suite)."""
    from app.models import Job, JobState
    from workers.runtime import JobLost

    owned = session.execute(
        select(Job.id)
        .where(Job.id == ctx.job_id, Job.state == JobState.running, Job.attempts == ctx.attempt)
        .with_for_update()
    ).first()
    if owned is None:
        raise JobLost(f"job {ctx.job_id} attempt {ctx.attempt} no longer owns the job: no version registered")


def register_version(
    ctx: JobContext,
    spec: Spec,
    dataset: Dataset,
    bundle_url: str,
    metrics: dict[str, Any],
    *,
    task: str,
    input_kind: str,
    arch: str | None = None,
) -> tuple[int, bool]:
    """A new version (max + 1 for this tenant and name), once per job even across retries."""
    from app.cards import at_registration  # the card's written parts and this worker's software versions

    card = at_registration(spec)
    for _ in range(5):
        with ctx.db.session() as s:
            fence_registration(s, ctx)
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
                    arch=arch or spec["arch"],
                    task=task,
                    input_kind=input_kind,
                    spec=spec,
                    dataset_id=dataset.id,
                    dataset_sha256=dataset.sha256,
                    metrics=metrics,
                    artifact_uri=bundle_url,
                    job_id=ctx.job_id,
                    card=card,
                )
            )
            try:
                s.flush()
            except IntegrityError:  # a concurrent job took this number; try the next
                s.rollback()
                continue
            return version, True
    raise RuntimeError("could not allocate a model version")


def package_and_register(
    ctx: JobContext,
    spec: Spec,
    dataset: Dataset,
    store: ArtifactStore,
    model: nn.Module,
    data: PreparedData,
    device: torch.device,
    metrics: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """Post-fit quality (calibration, domain, uncertainty: workers/ml/quality.py) and
    faithfulness (workers/ml/explain.py) into one bundle and one version. Returns (version,
    the version's metrics)."""
    from workers.ml import explain, onnx_export
    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.quality import package as quality_package

    ctx.progress(0.99, "calibrating and measuring the applicability domain", force=True)
    model.to(device).eval()
    package = quality_package(model, data, device, coverage=spec.get("coverage", 0.9))
    metrics = {**metrics, **package.metrics}
    if spec.get("explain_faithfulness", True) and data.input["kind"] in explain.EXPLAINABLE_INPUTS:
        ctx.progress(0.995, "measuring attribution faithfulness", force=True)
        faithfulness = explain.faithfulness(model, data, device)
        if faithfulness is not None:
            metrics["faithfulness"] = faithfulness
    config = bundle_config(
        model,
        data,
        metrics=metrics,
        train=spec,
        data_info=data.info,
        calibration=package.calibration,
        domain=package.domain,
        augment=spec.get("augment") if random_smiles_of(spec) else None,
    )
    bundle_dir = store.tenant_dir(ctx.tenant_id, "models", spec["model_name"], uuid.uuid4().hex)
    save_bundle(bundle_dir, model, config, reference=package.reference)
    ctx.progress(0.997, "exporting to ONNX and checking it with ONNX Runtime", force=True)
    metrics["onnx"] = onnx_export.export_at_registration(bundle_dir, model, data)
    version, _created = register_version(
        ctx, spec, dataset, store.url(bundle_dir), metrics, task=data.head.name, input_kind=data.input["kind"]
    )
    return version, metrics


def load_dataset(ctx: JobContext, spec: Spec) -> Dataset:
    with ctx.db.session() as s:
        dataset = s.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == ctx.tenant_id))
    if dataset is None:
        raise ValueError(f"dataset {spec['dataset_id']} no longer exists")
    return dataset


def run(ctx: JobContext, spec: Spec) -> JobResult:
    if int(spec.get("ensemble") or 1) > 1:
        return run_ensemble(ctx, spec)
    return run_single(ctx, spec)


def report_unreported_epochs(ctx: JobContext, history: list[dict[str, Any]]) -> None:
    """On resuming from a checkpoint: report the epochs it holds that have no metric event. An
    epoch is checkpointed before it is reported, so an attempt killed or cut off from the
    database in between never reported it, and the attempt resuming after it would leave a
    hole in the job's metrics (found by the chaos suite's partition trial)."""
    from app.models import JobEvent

    with ctx.db.session() as s:
        rows = s.scalars(select(JobEvent.data).where(JobEvent.job_id == ctx.job_id, JobEvent.type == "metric")).all()
    reported = {int(d["epoch"]) for d in rows if isinstance(d, dict) and "epoch" in d}
    missing = [m for m in history if "epoch" in m and int(m["epoch"]) not in reported]
    if missing:
        epochs = [int(m["epoch"]) for m in missing]
        ctx.log(f"resumed after epochs {epochs}, checkpointed but not reported by an earlier attempt", epochs=epochs)
    for metrics in missing:
        ctx.metric(**metrics)


def run_single(ctx: JobContext, spec: Spec) -> JobResult:
    from workers.ml.training import TrainingCancelled, fit, resolve_device
    from workers.runtime import JobCancelled

    store = ArtifactStore.from_settings(ctx.settings)
    dataset = load_dataset(ctx, spec)
    ctx.progress(0.0, "loading data", force=True)
    pretrained = pretrained_dir(ctx.db, store, spec, ctx.tenant_id)
    data = prepare_data(spec, dataset, store, vocabulary=pretrained_tokenizer(pretrained))
    model = build_member(spec, data, spec["seed"], pretrained)
    cfg = train_config(spec, spec["seed"])
    device = resolve_device(cfg.device)
    devices = int(spec.get("devices") or 1)
    on = f"{devices} x {device.type}" if devices > 1 else str(device)
    ctx.log(
        f"training {spec['arch']} on {on} ({sum(p.numel() for p in model.parameters())} parameters)",
        device=str(device),
        devices=devices,
        rows=data.info,
        init_from=spec.get("init_from_version"),
    )

    def on_epoch(epoch: int, metrics: dict) -> None:
        ctx.metric(**{"epoch": epoch, **metrics})

    def on_resume(history: list[dict[str, Any]]) -> None:
        report_unreported_epochs(ctx, history)

    def on_progress(fraction: float, message: str, eta_s: float | None) -> None:
        ctx.progress(0.98 * fraction, message, eta_s=None if eta_s is None else round(eta_s, 1))

    started = time.monotonic()
    try:
        fitting: dict[str, Any] = {
            "checkpoint_path": ctx.job_dir() / "checkpoint.pt",
            "on_epoch": on_epoch,
            "on_progress": on_progress,
            "should_stop": ctx.should_stop,
            "on_resume": on_resume,
        }
        if devices > 1:  # DDP over `devices` rank processes; this process keeps the lease and reports
            from workers.kinds.train_ranks import rank_inputs
            from workers.ml.distributed import fit_on_devices

            inputs = rank_inputs(ctx.settings, ctx.tenant_id, spec)
            outcome = fit_on_devices(model, data, cfg, devices, inputs=inputs, **fitting)
        else:
            outcome = fit(model, data, cfg, **fitting)
    except TrainingCancelled:
        ctx.check_cancel()  # raises JobCancelled (or JobLost)
        raise JobCancelled() from None
    train_seconds = time.monotonic() - started
    version, metrics = package_and_register(ctx, spec, dataset, store, model, data, device, fit_summary(outcome))
    return {
        "model": spec["model_name"],
        "version": version,
        "metrics": metrics,
        "epochs_trained": outcome.get("epochs_trained"),
        "best_epoch": outcome.get("best_epoch"),
        "stopped_early": outcome.get("stopped_early"),
        "device": str(device),
        **({"devices": devices, "train_devices": outcome.get("device")} if devices > 1 else {}),
        "data": data.info,
        "train_seconds": round(train_seconds, 3),
    }


# -- ensembles: members as units of work ----------------------------------------------------

# A running member's ScoreShard.rows_done is its progress in thousandths (a member has no rows).
MEMBER_SCALE = 1000


def member_checkpoint(job_dir: Path, index: int) -> Path:
    return job_dir / f"member-{index:02d}.ckpt.pt"


def member_weights(job_dir: Path, index: int) -> Path:
    return job_dir / f"member-{index:02d}.safetensors"


def job_event(db: Any, job_id: int, type_: str, data: dict[str, Any]) -> None:
    """An event of the job from whoever trains a member (its parent or another worker), filed
    under the job's current attempt; dropped while the job is not running (its parent died)."""
    from app import jobs
    from app.models import Job

    with db.session() as s:
        attempt = s.scalar(select(Job.attempts).where(Job.id == job_id))
        if attempt is not None:
            jobs.report_event(s, job_id, attempt, type_, data)


@dataclass
class MemberJob(UnitJob):
    """What training a member of one job needs (read once per member)."""

    spec: Spec
    store: ArtifactStore
    job_dir: Path

    @classmethod
    def load(cls, db: Any, settings: Settings, job_id: int) -> MemberJob:
        from app.artifacts import job_dir
        from app.models import Job

        with db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} no longer exists")
            spec, tenant_id, queue, max_attempts = dict(job.spec), job.tenant_id, job.queue, job.max_attempts
        directory = job_dir(settings, tenant_id, job_id)
        directory.mkdir(parents=True, exist_ok=True)
        store = ArtifactStore.from_settings(settings)
        return cls(db, settings, job_id, tenant_id, queue, max_attempts, spec, store, directory)

    def dataset(self) -> Dataset:
        with self.db.session() as s:
            dataset = s.scalar(
                select(Dataset).where(Dataset.id == self.spec["dataset_id"], Dataset.tenant_id == self.tenant_id)
            )
        if dataset is None:
            raise ValueError(f"dataset {self.spec['dataset_id']} no longer exists")
        return dataset


def train_member(
    job: MemberJob,
    claim: Claim,
    should_stop: Callable[[], bool],
    on_progress: Callable[[], None] | None = None,
) -> str:
    """Train claimed member `claim.index` (seed + index) under its lease, resuming from its
    checkpoint, and leave its weights in the job's directory. Returns done, cancelled (its job
    was cancelled or ended; released), stopped (should_stop(); released), lost (taken away),
    failed (released as leases.after_failure decides: retried or failed)."""
    from app import leases
    from workers.lease import Lease
    from workers.ml.bundle import write_tensors
    from workers.ml.training import fit

    index, spec, db = claim.index, job.spec, job.db
    seed = spec["seed"] + index
    progress = [0]
    interval = min(job.settings.heartbeat_interval_s, 2.0)
    with Lease(
        db,
        leases.SHARDS,
        claim.id,
        claim.attempt,
        interval,
        extra=lambda: {"rows_done": progress[0]},
        name=f"member-{job.job_id}-{index}",
    ) as lease:
        try:
            pretrained = pretrained_dir(db, job.store, spec, job.tenant_id)
            data = prepare_data(
                spec, job.dataset(), job.store, augment_seed=seed, vocabulary=pretrained_tokenizer(pretrained)
            )
            model = build_member(spec, data, seed, pretrained)

            def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
                job_event(db, job.job_id, "metric", {"member": index, "seed": seed, **metrics, "epoch": epoch})

            def member_progress(fraction: float, _message: str, _eta_s: float | None) -> None:
                progress[0] = int(min(fraction, 1.0) * (MEMBER_SCALE - 1))
                if on_progress is not None:
                    on_progress()

            outcome = fit(
                model,
                data,
                train_config(spec, seed),
                checkpoint_path=member_checkpoint(job.job_dir, index),
                on_epoch=on_epoch,
                on_progress=member_progress,
                should_stop=lambda: lease.check() or should_stop(),
            )
            path = member_weights(job.job_dir, index)
            write_tensors(path, model.state_dict())
            stats = {"member": index, "seed": seed, **fit_summary(outcome), "stopped_early": outcome["stopped_early"]}
            values = {"rows": 0, "valid": 0, "rows_done": MEMBER_SCALE, "output_uri": job.store.url(path)}
            with db.session() as s:
                ok = leases.finish(s, leases.SHARDS, claim.id, claim.attempt, {**values, "stats": stats, "error": None})
            return "done" if ok else "lost"
        except Exception as exc:
            return interrupted(db, claim, lease, exc, f"train job {job.job_id} member {index}")


def run_member_task(db: Any, settings: Settings, job_id: int, index: int, worker: str) -> str:
    """One member message (the shard task of a `train` job): claim the member (a duplicate or
    late delivery loses and returns 'skipped'), train it, meter it."""
    from app.stores.usage import model_of
    from workers import metering

    claim = claim_for_message(db, job_id, index, worker)
    if claim is None:
        return "skipped"
    with metering.metered() as meter:
        try:
            job = MemberJob.load(db, settings, job_id)
        except Exception as exc:
            log.exception("train job %s member %s: cannot prepare", job_id, index)
            return release_failed(db, claim, exc, trace=False)
        outcome = train_member(job, claim, lambda: False)
    if outcome != "lost":  # a lost attempt's work is not the tenant's
        with db.session() as s:
            metering.record(s, job.tenant_id, meter.stop().quantities(*model_of(job.spec)))
    log.info("train job %s member %s attempt %s: %s", job_id, index, claim.attempt, outcome)
    return outcome


def member_summary(db: Any, job_id: int) -> dict[str, Any]:
    """Members by state, the mean progress over members (done = 1, running = its share), and
    the first failed member's error."""
    from app.models import ScoreShard, ShardState

    with db.session() as s:
        rows = s.execute(
            select(ScoreShard.index, ScoreShard.state, ScoreShard.rows_done, ScoreShard.error)
            .where(ScoreShard.job_id == job_id)
            .order_by(ScoreShard.index)
        ).all()
    out: dict[str, Any] = {state.value: 0 for state in ShardState}
    shares = []
    out["error"] = None
    for index, state, rows_done, error in rows:
        out[state.value] += 1
        shares.append(1.0 if state == ShardState.done else (rows_done or 0) / MEMBER_SCALE)
        if state == ShardState.failed and out["error"] is None:
            out["error"] = (index, error)
    out["members"] = len(rows)
    out["fraction"] = sum(shares) / len(shares) if shares else 0.0
    return out


def run_ensemble(ctx: JobContext, spec: Spec) -> JobResult:
    """The parent of an ensemble: create the members (once), publish all but one, train
    members itself until none is pending, wait for the others' (their notifications wake it),
    then assemble, package and register one version."""
    from workers.runtime import JobLost
    from workers.scoring import shards

    db, n = ctx.db, int(spec["ensemble"])
    started = time.monotonic()
    try:
        ctx.progress(0.0, f"training {n} ensemble members", force=True)
        job = MemberJob.load(db, ctx.settings, ctx.job_id)
        ctx.log(f"ensemble seeds {spec['seed']}..{spec['seed'] + n - 1}")
        run_unit_job(
            ctx,
            count=n,
            queue=job.queue,
            summary=lambda: member_summary(db, ctx.job_id),
            run_claimed=lambda claim, on_progress: train_member(job, claim, ctx.should_stop, on_progress=on_progress),
            share=0.98,
            label="ensemble members",
            unit="ensemble member",
            units="members",
            max_attempts=job.max_attempts,
        )
        return assemble_ensemble(ctx, job, started)
    except JobLost:
        raise
    except Exception:
        with db.session() as s:  # cancelled or failed: stop the outstanding members
            shards.cancel_shards(s, ctx.job_id)
        raise


def assemble_ensemble(ctx: JobContext, job: MemberJob, started: float) -> JobResult:
    """Load every member's weights into one Ensemble, measure it, package and register it."""
    from safetensors.torch import load as safetensors_load

    from workers.ml.ensemble import Ensemble
    from workers.ml.models import build_model
    from workers.ml.training import evaluate_members, make_loader, resolve_device
    from workers.scoring import shards

    spec, store = job.spec, job.store
    with ctx.db.session() as s:
        done = shards.shards_of(s, ctx.job_id)
    ctx.progress(0.985, "assembling the ensemble", force=True)
    dataset = job.dataset()
    pretrained = pretrained_dir(ctx.db, store, spec, ctx.tenant_id)
    data = prepare_data(spec, dataset, store, augment_seed=spec["seed"], vocabulary=pretrained_tokenizer(pretrained))
    params = model_params(spec, data)
    members = []
    for sh in done:
        if sh.output_uri is None:
            raise RuntimeError(f"ensemble member {sh.index} is done but has no weights")
        member = build_model(spec["arch"], params)
        with open_read(store.path(sh.output_uri)) as fh:
            member.load_state_dict(safetensors_load(fh.read()), strict=True)
        members.append(member.eval())
    device = resolve_device(spec["device"])
    ensemble = Ensemble(members).to(device).eval()
    eval_bs = spec["batch_size"] * 4
    evaluated = {
        name: evaluate_members(members, make_loader(ds, eval_bs, shuffle=False, device=device), data.head, device)
        for name, ds in (("val", data.val), ("test", data.test))
        if ds is not None
    }
    member_stats = [sh.stats for sh in done]
    metrics = {
        "test": evaluated.get("test", {}),
        "val": evaluated.get("val", {}),
        "members": member_stats,
        "epochs_trained": max((m.get("epochs_trained") or 0 for m in member_stats), default=0),
    }
    version, metrics = package_and_register(ctx, spec, dataset, store, ensemble, data, device, metrics)
    workers = sorted({sh.worker or "" for sh in done} - {""})
    return {
        "model": spec["model_name"],
        "version": version,
        "metrics": metrics,
        "ensemble": len(members),
        "members": {"count": len(done), "attempts": sum(sh.attempts for sh in done), "workers": workers or None},
        "epochs_trained": metrics["epochs_trained"],
        "device": str(device),
        "data": data.info,
        "train_seconds": round(time.monotonic() - started, 3),
    }
