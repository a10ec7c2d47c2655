"""Runs `search` (spec: app/kinds/search.py): hyper-parameter search with Optuna.

The study lives in the platform's own database through optuna's RDBStorage (in PostgreSQL in
a schema of its own, `optuna`, so its tables and alembic revision stay apart from ours; in
SQLite in the same file). Each trial slot is a unit of work on the shard lease (app/leases.py
SHARDS, one ScoreShard row per slot, index = slot), driven like ensemble members
(workers/units.py `drive_units`): the parent publishes the slots for every worker on the queue
and trains slots itself; the shard task of any worker (workers/tasks.py run_unit) trains one.

A slot asks the study for a trial (its id is kept in the slot's `stats`), trains the train
spec with the trial's parameters, reports the validation metric every epoch and stops when the
pruner (successive halving or Hyperband) says so. A slot whose worker died is reaped and
retried: the next attempt resumes the same Optuna trial from the slot's epoch checkpoint; once
its attempts are spent the slot is `failed` ("lost") and its trial marked FAIL: accounted for,
not fatal. The parent then registers the best complete trial as a version of the search job
(ModelVersion.job_id = the search; its spec carries `search`: job id, trial, parameters).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text

from app.config import Settings
from app.kinds import Spec
from app.kinds.search import trial_spec, trials_table
from app.models import Dataset, ScoreShard, ShardState
from workers.kinds import JobResult
from workers.kinds.train import (
    MEMBER_SCALE,
    MemberJob,
    build_member,
    fit_summary,
    job_event,
    model_params,
    package_and_register,
    prepare_data,
    pretrained_dir,
    pretrained_tokenizer,
    train_config,
)
from workers.runtime import JobContext
from workers.units import claim_for_message, interrupted, release_failed, run_unit_job

if TYPE_CHECKING:
    import optuna

    from workers.scoring.shards import Claim

log = logging.getLogger(__name__)

OPTUNA_SCHEMA = "optuna"  # PostgreSQL: the schema Optuna's tables live in
MIN_TRIALS_FOR_IMPORTANCE = 4
_STORAGES: dict[str, Any] = {}
_STORAGE_LOCK = threading.Lock()


def optuna_storage(settings: Settings) -> optuna.storages.RDBStorage:
    """Optuna's SQL storage on the platform's database (one per process and URL)."""
    import optuna
    from sqlalchemy import create_engine

    url = settings.sqlalchemy_url
    with _STORAGE_LOCK:
        storage = _STORAGES.get(url)
        if storage is not None:
            return storage
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if url.startswith("postgresql"):
            engine = create_engine(url)
            try:
                with engine.begin() as conn:
                    conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
            finally:
                engine.dispose()
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs={
                    "pool_pre_ping": True,
                    "connect_args": {"options": f"-csearch_path={OPTUNA_SCHEMA}"},
                },
            )
        else:
            # SQLite: one file. Our migrations already stamped its alembic_version, which is not
            # Optuna's revision: skip its schema check (its tables are created as they are).
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 30}}, skip_compatibility_check=True
            )
        _STORAGES[url] = storage
        return storage


def study_name(job_id: int) -> str:
    return f"medmaas-search-{job_id}"


def open_study(settings: Settings, spec: Spec, job_id: int, slot: int | None = None) -> optuna.Study:
    """The search's study (created on first use; every worker builds the same pruner from the
    spec). The sampler draws from a stream of its own per trial slot: a sampler re-seeded alike
    for every trial would draw the same parameters each time it samples at random."""
    import optuna

    trials = int(spec["budget"]["trials"])
    pruner: optuna.pruners.BasePruner
    if spec["pruner"] == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=spec["min_resource"],
            max_resource=spec["train"]["epochs"],
            reduction_factor=spec["reduction_factor"],
        )
    elif spec["pruner"] == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec["min_resource"], reduction_factor=spec["reduction_factor"]
        )
    else:
        pruner = optuna.pruners.NopPruner()
    seed = (spec["train"]["seed"] * 1_000_003 + job_id * 10_007 + (slot or 0)) % 2**31
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))
    return optuna.create_study(
        storage=optuna_storage(settings),
        study_name=study_name(job_id),
        direction=spec["direction"],
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def distributions(spec: Spec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, e in spec["space"].items():
        if e["type"] == "categorical":
            out[name] = CategoricalDistribution(e["choices"])
        elif e["type"] == "int":
            out[name] = IntDistribution(e["low"], e["high"], log=e["log"], step=e["step"] or 1)
        else:
            out[name] = FloatDistribution(float(e["low"]), float(e["high"]), log=e["log"], step=e["step"])
    return out


def trial_checkpoint(job_dir: Path, slot: int) -> Path:
    return job_dir / f"trial-{slot:03d}.ckpt.pt"


def trial_weights(job_dir: Path, slot: int) -> Path:
    return job_dir / f"trial-{slot:03d}.safetensors"


@dataclass
class SearchJob(MemberJob):
    """What running a trial of one search needs (MemberJob's fields; the spec is the search's)."""

    @classmethod
    def load(cls, db: Any, settings: Settings, job_id: int) -> SearchJob:
        job = super().load(db, settings, job_id)
        assert isinstance(job, SearchJob)
        return job

    @property
    def train(self) -> Spec:
        return dict(self.spec["train"])

    def dataset(self) -> Dataset:
        with self.db.session() as s:
            dataset = s.scalar(
                select(Dataset).where(Dataset.id == self.train["dataset_id"], Dataset.tenant_id == self.tenant_id)
            )
        if dataset is None:
            raise ValueError(f"dataset {self.train['dataset_id']} no longer exists")
        return dataset


def _deadline(study: optuna.Study) -> float | None:
    value = study.user_attrs.get("deadline")
    return float(value) if value is not None else None


def _finished_stats(trial: optuna.trial.FrozenTrial, stats: dict[str, Any]) -> dict[str, Any]:
    state = trial.state.name.lower()
    value = trial.value if trial.value is not None and math.isfinite(trial.value) else None
    curve = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    return {**stats, "trial": trial.number, "trial_id": trial._trial_id, "state": state, "value": value,
            "params": trial.params, "curve": curve}  # fmt: skip


def _own_trial(study: optuna.Study, stats: dict[str, Any], slot: int) -> optuna.trial.FrozenTrial | None:
    """The Optuna trial an earlier attempt of this slot asked for, if any."""
    trials = study.get_trials(deepcopy=False)
    trial_id = stats.get("trial_id")
    for t in trials:
        if (trial_id is not None and t._trial_id == trial_id) or t.user_attrs.get("slot") == slot:
            return t
    return None


def train_trial(
    job: SearchJob,
    claim: Claim,
    should_stop: Any,
    on_progress: Any = None,
) -> str:
    """Run claimed trial slot `claim.index` under its lease. Returns done (complete, pruned,
    failed by training or skipped by the time budget: all accounted for in the slot's stats),
    cancelled / stopped (released; a later attempt resumes the same trial), lost (taken away),
    failed (released as leases.after_failure decides)."""
    import optuna
    from optuna.trial import TrialState

    from app import leases
    from workers.lease import Lease
    from workers.ml.bundle import write_tensors
    from workers.ml.training import TrainingCancelled, fit

    slot, spec, db = claim.index, job.spec, job.db
    with db.session() as s:
        stats: dict[str, Any] = dict(s.scalar(select(ScoreShard.stats).where(ScoreShard.id == claim.id)) or {})
    progress = [0]
    interval = min(job.settings.heartbeat_interval_s, 2.0)

    def finish(values: dict[str, Any]) -> str:
        with db.session() as s:
            ok = leases.finish(
                s, leases.SHARDS, claim.id, claim.attempt,
                {"rows": 0, "valid": 0, "rows_done": MEMBER_SCALE, "stats": values, "error": None},
            )  # fmt: skip
        return "done" if ok else "lost"

    with Lease(
        db,
        leases.SHARDS,
        claim.id,
        claim.attempt,
        interval,
        extra=lambda: {"rows_done": progress[0], "stats": dict(stats)},
        name=f"trial-{job.job_id}-{slot}",
    ) as lease:
        trial: optuna.Trial | None = None
        try:
            study = open_study(job.settings, spec, job.job_id, slot=slot * 1000 + claim.attempt)
            frozen = _own_trial(study, stats, slot)
            if frozen is not None and frozen.state.is_finished():
                return finish(_finished_stats(frozen, stats))  # told before its worker died
            if frozen is None:
                deadline = _deadline(study)
                if deadline is not None and time.time() > deadline:
                    return finish({"state": "skipped", "reason": "time budget spent"})
                trial = study.ask(distributions(spec))
                trial.set_user_attr("slot", slot)
            else:
                trial = optuna.Trial(study, frozen._trial_id)  # resume it: same parameters
            stats.update(trial=trial.number, trial_id=trial._trial_id, state="running", params=trial.params)
            known = study._storage.get_trial(trial._trial_id).intermediate_values
            stats["curve"] = [known[k] for k in sorted(known)]
            with db.session() as s:  # remember the trial at once: a retry must find it
                leases.heartbeat(s, leases.SHARDS, claim.id, claim.attempt, {"stats": dict(stats)})

            tspec = trial_spec(spec, trial.params)
            seed = tspec["seed"]  # every trial splits the data alike: their metrics compare
            pretrained = pretrained_dir(db, job.store, tspec, job.tenant_id)
            data = prepare_data(tspec, job.dataset(), job.store, vocabulary=pretrained_tokenizer(pretrained))
            model = build_member(tspec, data, seed, pretrained)
            key = f"val_{spec['metric']}"
            pruned = [False]
            running = trial

            def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
                value = metrics.get(key)
                job_event(db, job.job_id, "metric", {"trial": running.number, "slot": slot, **metrics, "epoch": epoch})
                if value is None or not math.isfinite(value):
                    return
                if epoch not in known:
                    running.report(float(value), epoch)
                    stats["curve"] = [*stats["curve"], float(value)]
                if running.should_prune():
                    pruned[0] = True

            def trial_progress(fraction: float, _message: str, _eta_s: float | None) -> None:
                progress[0] = int(min(fraction, 1.0) * (MEMBER_SCALE - 1))
                if on_progress is not None:
                    on_progress()

            try:
                outcome = fit(
                    model,
                    data,
                    train_config(tspec, seed),
                    checkpoint_path=trial_checkpoint(job.job_dir, slot),
                    on_epoch=on_epoch,
                    on_progress=trial_progress,
                    should_stop=lambda: pruned[0] or lease.check() or should_stop(),
                )
            except TrainingCancelled:
                if not pruned[0]:
                    raise
                study.tell(trial, state=TrialState.PRUNED)
                return finish(_finished_stats(study._storage.get_trial(trial._trial_id), stats))
            except FloatingPointError as exc:  # diverged: an outcome of these parameters, not retried
                study.tell(trial, state=TrialState.FAIL)
                return finish({**_finished_stats(study._storage.get_trial(trial._trial_id), stats), "error": str(exc)})
            value = (outcome.get("val") or {}).get(spec["metric"])
            path = trial_weights(job.job_dir, slot)
            write_tensors(path, model.state_dict())
            if value is None or not math.isfinite(value):
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, float(value))
            done = _finished_stats(study._storage.get_trial(trial._trial_id), stats)
            return finish({**done, **fit_summary(outcome), "output_uri": job.store.url(path)})
        except Exception as exc:
            return interrupted(db, claim, lease, exc, f"search job {job.job_id} trial slot {slot}")


def run_trial_task(db: Any, settings: Settings, job_id: int, index: int, worker: str) -> str:
    """One trial message (the shard task of a `search` job): claim the slot (a duplicate or
    late delivery loses and returns 'skipped'), run its trial, meter it."""
    from app.stores.usage import model_of
    from workers import metering

    claim = claim_for_message(db, job_id, index, worker)
    if claim is None:
        return "skipped"
    with metering.metered() as meter:
        try:
            job = SearchJob.load(db, settings, job_id)
        except Exception as exc:
            log.exception("search job %s trial slot %s: cannot prepare", job_id, index)
            return release_failed(db, claim, exc, trace=False)
        outcome = train_trial(job, claim, lambda: False)
    if outcome != "lost":
        with db.session() as s:
            metering.record(s, job.tenant_id, meter.stop().quantities(*model_of(job.spec["train"])))
    log.info("search job %s trial slot %s attempt %s: %s", job_id, index, claim.attempt, outcome)
    return outcome


def slot_summary(db: Any, job_id: int) -> dict[str, Any]:
    """Slots by state for drive_units: a slot whose attempts are spent (`failed`, its worker
    lost or its run broken) is an accounted-for trial, counted as done, not a job failure."""
    with db.session() as s:
        rows = s.execute(select(ScoreShard.state, ScoreShard.rows_done).where(ScoreShard.job_id == job_id)).all()
    out: dict[str, Any] = {state.value: 0 for state in ShardState}
    shares = []
    for state, rows_done in rows:
        out[state.value] += 1
        finished = state in (ShardState.done, ShardState.failed)
        shares.append(1.0 if finished else (rows_done or 0) / MEMBER_SCALE)
    out["lost"] = out.pop("failed")
    out["failed"] = 0
    out["done"] += out["lost"]
    out["error"] = None
    out["trials"] = len(rows)
    out["fraction"] = sum(shares) / len(shares) if shares else 0.0
    return out


def fail_running_trials(study: optuna.Study) -> int:
    """Trials still RUNNING in the study once no slot runs them (their slot was lost or
    cancelled, or an attempt died between asking and recording): FAIL."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            n += 1
        except Exception:  # finished meanwhile by a late attempt
            log.debug("trial %s changed state meanwhile", t.number, exc_info=True)
    return n


def run(ctx: JobContext, spec: Spec) -> JobResult:
    """The parent of a search: create the study and the trial slots (once), publish all but one,
    run slots itself until none is pending, wait for the others', then register the best."""
    from workers.runtime import JobLost
    from workers.scoring import shards

    db, n = ctx.db, int(spec["budget"]["trials"])
    started = time.monotonic()
    study = open_study(ctx.settings, spec, ctx.job_id)
    try:
        if spec["budget"].get("time_s") and "deadline" not in study.user_attrs:
            study.set_user_attr("deadline", time.time() + spec["budget"]["time_s"])
        job = SearchJob.load(db, ctx.settings, ctx.job_id)
        ctx.log(f"searching {len(spec['space'])} parameters")
        run_unit_job(
            ctx,
            count=n,
            queue=job.queue,
            summary=lambda: slot_summary(db, ctx.job_id),
            run_claimed=lambda claim, on_progress: train_trial(job, claim, ctx.should_stop, on_progress=on_progress),
            share=0.97,
            label="trials",
            unit="trial",
            units="trials",
            max_attempts=job.max_attempts,
        )
        fail_running_trials(study)
        return register_best(ctx, job, study, started)
    except JobLost:
        raise
    except Exception:
        with db.session() as s:  # cancelled or failed: stop the outstanding trials
            shards.cancel_shards(s, ctx.job_id)
        fail_running_trials(study)
        raise


def importance(study: optuna.Study) -> dict[str, float] | None:
    """Parameter importance (fANOVA) once enough trials completed; None before."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or len(study.get_trials(deepcopy=False)) < 2:
        return None
    try:
        return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # e.g. every complete trial has the same value
        log.info("parameter importance not available", exc_info=True)
        return None


def register_best(ctx: JobContext, job: SearchJob, study: optuna.Study, started: float) -> JobResult:
    """Register the best complete trial as a version of this job: its weights (left by the trial),
    packaged like any trained model, with the search in its spec and metrics."""
    from safetensors.torch import load as safetensors_load

    from app.artifacts import open_read
    from workers.ml.models import build_model
    from workers.ml.training import resolve_device

    spec, store = job.spec, job.store
    with ctx.db.session() as s:
        table = trials_table(s, ctx.job_id, spec)
    best = table["best"]
    counts = table["counts"]
    if best is None:
        raise RuntimeError(f"no trial of the search completed ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    with ctx.db.session() as s:
        stats = dict(s.scalar(select(ScoreShard.stats).where(ScoreShard.job_id == ctx.job_id,
                                                              ScoreShard.index == best["slot"])) or {})  # fmt: skip
    ctx.progress(0.975, f"registering trial {best['trial']} ({spec['metric']} {best['value']:.4g})", force=True)
    lineage = {
        "job_id": ctx.job_id,
        "trial": best["trial"],
        "slot": best["slot"],
        "params": best["params"],
        "metric": spec["metric"],
        "direction": table["direction"],
        "value": best["value"],
    }
    tspec = {**trial_spec(spec, best["params"]), "search": lineage}
    dataset = job.dataset()
    pretrained = pretrained_dir(ctx.db, store, tspec, ctx.tenant_id)
    data = prepare_data(tspec, dataset, store, vocabulary=pretrained_tokenizer(pretrained))
    model = build_model(tspec["arch"], model_params(tspec, data))
    if not stats.get("output_uri"):
        raise RuntimeError(f"trial {best['trial']} is complete but left no weights")
    with open_read(store.path(stats["output_uri"])) as fh:
        model.load_state_dict(safetensors_load(fh.read()), strict=True)
    device = resolve_device(tspec["device"])
    metrics = {**{k: stats.get(k) for k in ("test", "val", "best_epoch", "epochs_trained")}, "search": lineage}
    version, metrics = package_and_register(ctx, tspec, dataset, store, model, data, device, metrics)
    imp = importance(study)
    rows = [{k: r[k] for k in ("slot", "trial", "state", "value", "params", "epochs", "attempts", "worker")}
            for r in table["rows"]]  # fmt: skip
    return {
        "model": tspec["model_name"],
        "version": version,
        "metric": spec["metric"],
        "direction": table["direction"],
        "best": {**lineage, "test": stats.get("test")},
        "trials": {"total": len(rows), **counts},
        "table": rows,
        "importance": imp,
        "metrics": metrics,
        "train_seconds": round(time.monotonic() - started, 3),
    }
