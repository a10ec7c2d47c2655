"""Scoring shards: the per-shard pipeline, the shard Celery task, and the parent job's loop.

Per shard, in constant memory (two batches in flight):

    read rows (seek to the shard's byte offset) --> batch of score_batch_size rows
      --> checks + RDKit canonicalisation (pool; overlaps with the previous batch's model work)
          (+ packed Morgan fingerprints, in the same pool, when the model has a domain reference)
      --> tokenise (one regex pass per batch) --> forward (length-bucketed batches, bf16 on CUDA)
          (+ spread, interval and domain columns when the model has them: score_smiles_full)
      --> Arrow record batch --> Parquet part file

A model without an ensemble, calibration or domain reference takes the plain path
(score_smiles), doing no extra work. After the merge, `explain_top_k` of the top-K rows are
drawn with their atom attributions (workers/ml/explain.py, workers/ml/draw.py) as SVG files
in the job's directory.

The parent job never waits idly on shards it could run itself: it claims pending shards
with the same compare-and-set as the shard task, so one worker finishes a job alone and
every extra worker on the queue takes shards off it. Shards are leased like jobs
(app/leases.py, workers/lease.py); while other workers hold the last shards, the parent
waits for their notifications (app/notify.py) instead of polling.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from app import artifacts, leases
from app.artifacts import ArtifactStore, job_dir, open_write, plaintext_size
from app.config import Settings
from app.ingest import IngestLimits, iter_library_rows, library_row_offsets
from app.ingest.library import library_schema
from app.kinds.score import EXPLAIN_DIR, explanation_file, explanation_url, score_files
from app.models import TERMINAL_STATES, Dataset, Job, ModelVersion, ShardState, UsageMetric
from app.stores.usage import Quantity, model_of
from workers import metering
from workers.lease import Lease
from workers.runtime import lost_database_connection, remove_scratch, scratch_dir
from workers.scoring import canon, shards, source
from workers.scoring import table as tbl
from workers.units import UnitJob, claim_for_message, drive_units, publish_pending, release_failed

log = logging.getLogger(__name__)

MAX_INVALID_SAMPLES = 20
# The forward pass runs in length-bucketed sub-batches of the pipeline's score_batch_size rows:
# the whole batch on CUDA, at most this many rows on CPU, where small batches are both faster
# and lighter (GRU, hidden 96, one thread, 2-core VM: ~3,200 molecules/s at 4,096 rows per
# forward, ~3,550 at 1,024, ~4,000 at 256; the transient activations of a 4,096-row forward
# are ~300 MB, which is most of a CPU worker's RSS swing).
CPU_FORWARD_BATCH = 512


class _Stopped(Exception):
    """The shard must stop between batches (job cancelled, shard taken away)."""


@dataclass
class ScoreEnv(UnitJob):
    """What scoring a shard of one job needs; built once per job and process."""

    spec: dict[str, Any]
    source: Path
    schema: dict[str, Any]
    predictor: Any
    score_cols: list[str]
    table_schema: Any
    scratch: Path
    limits: IngestLimits = field(default_factory=IngestLimits)
    # The trust columns: the Predictor's names for them (score_smiles_full's extras), in
    # the order their columns follow the outputs in score_cols; none on the plain path.
    extra_keys: list[str] = field(default_factory=list)
    coverage: float = 0.9
    fingerprint: dict[str, int] | None = None  # Morgan parameters of the domain reference

    @property
    def output_cols(self) -> list[str]:
        return self.score_cols[: len(self.score_cols) - len(self.extra_keys)]

    @property
    def parts_dir(self) -> Path:
        return self.scratch / "parts"

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore.from_settings(self.settings)


def _limits(settings: Settings) -> IngestLimits:
    return IngestLimits(max_bytes=settings.archive_max_bytes)


def load_env(db: Any, settings: Settings, job_id: int, *, prepare: bool = False) -> tuple[ScoreEnv, dict[str, Any]]:
    """Build the job's ScoreEnv. prepare=True (the parent) also writes the decompressed
    library copy when needed. Returns (env, info about the source)."""
    from workers.model_cache import get_predictor

    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} no longer exists")
        spec = dict(job.spec)
        dataset = s.scalar(select(Dataset).where(Dataset.id == spec["library_id"], Dataset.tenant_id == job.tenant_id))
        mv = s.get(ModelVersion, spec["model_version_id"])
        tenant_id, queue, max_attempts = job.tenant_id, job.queue, job.max_attempts
    if dataset is None:
        raise LookupError(f"library {spec['library_id']} no longer exists")
    if mv is None or mv.tenant_id != tenant_id:
        raise LookupError(f"model version {spec['model_version_id']} no longer exists")
    store = ArtifactStore.from_settings(settings)
    scratch = scratch_dir(settings, tenant_id, job_id)
    schema = library_schema(dataset.schema, spec.get("text_column"), spec.get("id_column"))
    upload = store.path(dataset.uri)
    info: dict[str, Any] = {"compressed": bool(schema.get("compressed")), "format": schema.get("format")}
    if prepare:
        path, schema, seconds = source.prepare_source(upload, schema, scratch, settings.archive_max_bytes)
        if seconds is not None:
            info["decompress_s"] = round(seconds, 3)
    else:
        path, schema = source.source_for(upload, schema, scratch)
        if not artifacts.exists(path):
            raise FileNotFoundError(f"the library copy {path.name} is missing from the job's scratch directory")
    predictor = get_predictor(
        store.path(mv.artifact_uri), settings.model_cache_size, spec.get("device") or "auto", settings.scoring_backend
    )
    if predictor.input["kind"] != "smiles":
        raise ValueError(f"model {mv.name} v{mv.version} takes {predictor.input['kind']}, not SMILES")
    coverage = float(spec.get("coverage", 0.9))
    extra_keys = list(predictor.score_columns(coverage))
    cols = tbl.score_columns([*predictor.output_names, *extra_keys])
    flags = {
        col for key, col in zip(extra_keys, cols[len(predictor.output_names) :], strict=True) if key == "in_domain"
    }
    env = ScoreEnv(
        db=db,
        settings=settings,
        job_id=job_id,
        tenant_id=tenant_id,
        queue=queue,
        max_attempts=max_attempts,
        spec=spec,
        source=path,
        schema=schema,
        predictor=predictor,
        score_cols=cols,
        table_schema=tbl.table_schema(cols, flags),
        scratch=scratch,
        limits=_limits(settings),
        extra_keys=extra_keys,
        coverage=coverage,
        fingerprint=domain_fingerprint(predictor) if "nn_similarity" in extra_keys else None,
    )
    return env, info


def domain_fingerprint(predictor: Any) -> dict[str, int]:
    """The Morgan parameters the model's domain reference was built with (workers/ml/domain.py)."""
    domain = predictor.config.get("domain") or {}
    return {"radius": int(domain.get("radius", 2)), "nbits": int(domain.get("nbits", 2048))}


def model_scores(env: ScoreEnv, texts: list[str], fingerprints: np.ndarray | None, batch_size: int) -> np.ndarray:
    """float32 [len(texts), len(score_cols)] for canonical SMILES: the outputs, then the trust
    columns (in_domain as 0 / 1). Without trust columns, the plain score_smiles path."""
    predictor = env.predictor
    if not env.extra_keys:
        return predictor.score_smiles(texts, batch_size=batch_size, canonical=True)[0]
    scores, _errors, extras = predictor.score_smiles_full(
        texts, canonical=True, coverage=env.coverage, fingerprints=fingerprints, batch_size=batch_size
    )
    columns = [np.asarray(extras[key], dtype=np.float32).reshape(-1, 1) for key in env.extra_keys]
    return np.concatenate([np.asarray(scores, dtype=np.float32), *columns], axis=1)


# -- the per-shard pipeline -------------------------------------------------------------------


@dataclass
class ShardStats:
    rows: int = 0
    valid: int = 0
    duplicates: int = 0
    reasons: Counter = field(default_factory=Counter)
    samples: list = field(default_factory=list)

    def add(self, batch: Any) -> None:
        self.rows += batch.num_rows
        valid = batch.column("valid").to_numpy(zero_copy_only=False)
        self.valid += int(valid.sum())
        bad = np.flatnonzero(~valid)
        if len(bad):
            errors = batch.column("error").to_pylist()
            rows = batch.column("row")
            texts = batch.column("smiles")
            for i in bad:
                reason = errors[i] or "invalid"
                self.reasons[reason.split(":", 1)[0]] += 1
                if len(self.samples) < MAX_INVALID_SAMPLES:
                    self.samples.append(
                        {"row": rows[i].as_py(), "smiles": (texts[i].as_py() or "")[:200], "error": reason}
                    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "valid": self.valid,
            "duplicates": self.duplicates,
            "invalid_reasons": dict(self.reasons),
            "invalid_samples": self.samples,
        }


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def score_batches(rows: Iterator[tuple[int, str | None, str]], env: ScoreEnv, stats: ShardStats) -> Iterator[Any]:
    """(row, id, text) tuples -> Arrow record batches of the score table, in input order.
    Batch k+1 is canonicalised in the pool while batch k is tokenised, scored and written."""
    spec = env.spec
    validate, max_length, dedupe = spec.get("validate", "rdkit"), spec.get("max_length", 2000), spec.get("dedupe")
    batch_size = env.settings.score_batch_size
    pool = canon.get_pool() if validate != "none" else None
    predictor, n_out = env.predictor, len(env.score_cols)
    fingerprint = env.fingerprint if validate != "none" else None  # else score_smiles_full computes them
    on_gpu = getattr(getattr(predictor, "device", None), "type", "cpu") == "cuda"
    forward_batch = batch_size if on_gpu else min(batch_size, CPU_FORWARD_BATCH)
    seen: dict[str, np.ndarray] | None = {} if dedupe else None  # per shard: bounded by score_shard_rows

    def finish(chunk: list, handle: canon.Canonicalised) -> Any:
        canonical, errors = handle.result()
        fingerprints = handle.fingerprints()  # None unless the model has a domain reference
        n = len(chunk)
        scores = np.full((n, n_out), np.nan, dtype=np.float32)
        # a row without an error has its canonical SMILES
        valid = [(i, c) for i, (c, e) in enumerate(zip(canonical, errors, strict=True)) if e is None and c is not None]
        valid_idx = [i for i, _ in valid]
        if valid:
            if seen is None:
                fps = fingerprints[valid_idx] if fingerprints is not None else None
                scores[valid_idx] = model_scores(env, [c for _, c in valid], fps, forward_batch)
            else:
                new: dict[str, int] = {}  # canonical SMILES -> the row (in this chunk) scoring it
                for i, c in valid:
                    if c in seen or c in new:
                        stats.duplicates += 1
                    else:
                        new[c] = i
                if new:
                    fps = fingerprints[list(new.values())] if fingerprints is not None else None
                    fresh = model_scores(env, list(new), fps, forward_batch)
                    for j, c in enumerate(new):
                        seen[c] = fresh[j]
                scores[valid_idx] = np.stack([seen[c] for _, c in valid])
        return tbl.build_batch(
            env.table_schema,
            env.score_cols,
            [r[0] for r in chunk],
            [r[1] for r in chunk],
            [r[2] for r in chunk],
            canonical if validate != "none" else [None] * n,
            scores,
            errors,
        )

    pending: tuple[list, canon.Canonicalised] | None = None
    try:
        for chunk in _chunks(rows, batch_size):
            handle = canon.Canonicalised([r[2] for r in chunk], validate, max_length, pool, fingerprint)
            if pending is not None:
                yield finish(*pending)
            pending = (chunk, handle)
        if pending is not None:
            out, pending = finish(*pending), None
            yield out
    finally:
        if pending is not None:
            pending[1].cancel()


@contextmanager
def cpu_threads_beside_pool(env: ScoreEnv) -> Iterator[None]:
    """On CPU with an RDKit pool busy on every core, the model gets half the cores (at least
    one): more intra-op threads only contend with the pool (measured on a 2-core VM: a GRU
    ran 3-4x slower with 2 threads than with 1 while RDKit children were busy). Without a
    pool, no more threads than the cores this process may run on."""
    import torch

    device = getattr(env.predictor, "device", None)
    if getattr(device, "type", "cpu") != "cpu":
        yield
        return
    before = torch.get_num_threads()
    cores = canon.available_cores()  # this process's CPU affinity, e.g. a worker pinned with taskset
    pool = env.spec.get("validate") != "none" and canon.default_pool_size() >= 2
    torch.set_num_threads(max(1, cores // 2) if pool else max(1, min(before, cores)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score_shard(
    env: ScoreEnv, claim: shards.Claim, should_stop: Callable[[], bool], on_batch: Callable[[], None] | None = None
) -> str:
    """Score one claimed shard into its part file and mark it done. Returns done, cancelled
    (the shard's lease saw its job cancelled or ended; the shard is released), stopped
    (should_stop(); released), lost (taken away: reaped or cancelled), failed (released as
    leases.after_failure decides: retried or failed)."""
    with cpu_threads_beside_pool(env):
        return _score_shard(env, claim, should_stop, on_batch)


def _score_shard(
    env: ScoreEnv, claim: shards.Claim, should_stop: Callable[[], bool], on_batch: Callable[[], None] | None
) -> str:
    part = env.parts_dir / f"shard-{claim.index:06d}-a{claim.attempt}.parquet"
    writer: tbl.PartWriter | None = None
    stats = ShardStats()
    started = time.monotonic()
    # progress (rows_done) refreshes at least every 2 s even when heartbeats are rarer
    with Lease(
        env.db,
        leases.SHARDS,
        claim.id,
        claim.attempt,
        min(env.settings.heartbeat_interval_s, 2.0),
        extra=lambda: {"rows_done": stats.rows},
        name=f"shard-{claim.job_id}-{claim.index}",
    ) as lease:
        try:
            writer = tbl.PartWriter(part, env.table_schema)
            rows = iter_library_rows(
                str(env.source), env.schema, claim.start_row, claim.stop_row, offset=claim.offset, limits=env.limits
            )
            for batch in score_batches(rows, env, stats):
                writer.write(batch)
                stats.add(batch)
                if on_batch is not None:
                    on_batch()
                if lease.check() or should_stop():
                    raise _Stopped()
            writer.close()
            expected = claim.stop_row - claim.start_row
            if stats.rows != expected:
                raise RuntimeError(
                    f"shard {claim.index} read {stats.rows} rows from the library, expected {expected} "
                    f"(rows {claim.start_row}..{claim.stop_row - 1}); was the file changed?"
                )
            shard_stats = {**stats.to_dict(), "seconds": round(time.monotonic() - started, 3)}
            with env.db.session() as s:
                ok = shards.finish(
                    s,
                    claim.id,
                    claim.attempt,
                    rows=stats.rows,
                    valid=stats.valid,
                    output_uri=env.store.url(part),
                    stats=shard_stats,
                )
                if ok:  # metered with the shard's end: a shard finishes once
                    scored = Quantity(UsageMetric.rows_scored, stats.rows, *model_of(env.spec))
                    metering.record(s, env.tenant_id, [scored])
            if not ok:
                artifacts.remove(part)
                return "lost"
            return "done"
        except _Stopped:
            if writer is not None:
                writer.abort()
            if lease.lost:
                return "lost"
            with env.db.session() as s:
                shards.release(s, claim.id, claim.attempt)
            return "cancelled" if lease.cancelled else "stopped"
        except Exception as exc:
            log.exception("score job %s shard %s attempt %s failed", env.job_id, claim.index, claim.attempt)
            if writer is not None:
                writer.abort()
            return release_failed(env.db, claim, exc)


# -- the shard task (any worker on the job's queue) ---------------------------------------------

_envs: dict[int, ScoreEnv] = {}


def run_shard_task(db: Any, settings: Settings, celery: Any, job_id: int, index: int, worker: str) -> str:
    """One shard message: claim the shard (a duplicate or late delivery loses and returns
    'skipped'), score it, record it. The job may be running or re-queued (its parent died);
    only a cancel or the job's end stops shard work (the shard's lease reports it)."""
    claim = claim_for_message(db, job_id, index, worker)
    if claim is None:
        return "skipped"
    with metering.metered() as meter:
        outcome, tenant_id, spec = _run_claimed_shard(db, settings, job_id, index, claim)
    if outcome != "lost" and tenant_id is not None:  # a lost attempt's work is not the tenant's
        with db.session() as s:
            metering.record(s, tenant_id, meter.stop().quantities(*model_of(spec)))
    log.info("score job %s shard %s attempt %s: %s", job_id, index, claim.attempt, outcome)
    return outcome


def _run_claimed_shard(
    db: Any, settings: Settings, job_id: int, index: int, claim: shards.Claim
) -> tuple[str, int | None, dict[str, Any]]:
    """Score a claimed shard: (outcome, the job's tenant, the job's spec); no tenant when the
    job could not be loaded."""
    try:
        env = _envs.get(job_id)
        if env is None or env.settings is not settings:
            env, _ = load_env(db, settings, job_id)
            _envs.clear()  # keep one job's env per process
            _envs[job_id] = env
    except Exception as exc:
        log.exception("score job %s shard %s: cannot prepare", job_id, index)
        return release_failed(db, claim, exc, trace=False), None, {}
    outcome = score_shard(env, claim, lambda: False)
    if outcome in ("cancelled", "lost"):
        with db.session() as s:
            row = s.execute(select(Job.state, Job.cancel_requested).where(Job.id == job_id)).first()
        if row is None or row[1] or row[0] in TERMINAL_STATES:
            # The job was cancelled and its parent deleted the scratch directory, possibly while
            # this shard was starting (which re-created it empty): remove what is left if empty.
            remove_scratch(settings, env.tenant_id, job_id, only_if_empty=True)
    return outcome, env.tenant_id, env.spec


# -- the parent job ---------------------------------------------------------------------------


class ProgressReporter:
    """Progress events for the parent: molecules done/total, molecules/s (over the last
    30 s), ETA, shards done. Reads shard counters from SQL at most once a second."""

    WINDOW_S = 30.0

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self._samples: deque = deque()
        self._last = 0.0
        self.summary: dict[str, Any] = {}

    def __call__(self, force: bool = False, refresh: bool = False) -> dict[str, Any]:
        """Report if a second has passed (or force); refresh=True re-reads the shard
        summary even when it is too early to report."""
        now = time.monotonic()
        due = force or now - self._last >= 1.0
        if not due and not refresh:
            return self.summary
        with self.ctx.db.session() as s:
            self.summary = summ = shards.summary(s, self.ctx.job_id)
        if not due:
            return summ
        self._last = now
        done, total = summ["rows_done"], summ["rows_total"]
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.WINDOW_S:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else None
        eta = (total - done) / rate if rate else None
        fraction = 0.99 * done / total if total else 0.99
        msg = (
            f"{done:,}/{total:,} molecules, shards {summ['done']}/{summ['shards']}"
            + (f", {rate:,.0f}/s" if rate else "")
            + (f", ETA {eta:,.0f} s" if eta is not None else "")
        )
        self.ctx.progress(
            fraction,
            msg,
            force=force,
            molecules_done=done,
            molecules_total=total,
            molecules_per_s=None if rate is None else round(rate, 1),
            eta_s=None if eta is None else round(eta, 1),
            shards_done=summ["done"],
            shards_running=summ["running"],
            shards_total=summ["shards"],
        )
        return summ


def _blocks(env: ScoreEnv, rows: int) -> list[tuple[int, int, int | None]]:
    n = env.settings.score_shard_rows
    offsets = library_row_offsets(str(env.source), env.schema, n, env.limits) if rows else []
    expected = -(-rows // n)
    if len(offsets) != expected:
        raise RuntimeError(
            f"the library now has a different number of rows than at upload ({rows}); "
            f"found {len(offsets)} shard starts, expected {expected}"
        )
    return [(k * n, min((k + 1) * n, rows), off) for k, off in enumerate(offsets)]


def run_parent(ctx: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from workers.runtime import JobLost

    db, settings = ctx.db, ctx.settings
    try:
        ctx.progress(0.0, "preparing the library", force=True)
        env, info = load_env(db, settings, ctx.job_id, prepare=True)
        rank_by = spec.get("rank_by") or (env.score_cols[0] if env.score_cols else None)
        rankable = [c for c in env.score_cols if str(env.table_schema.field(c).type) != "bool"]
        if rank_by not in rankable:
            raise ValueError(f"rank_by {rank_by!r} is not one of the score columns {rankable}")
        with db.session() as s:
            rows = s.scalar(select(Dataset.rows).where(Dataset.id == spec["library_id"]))
            existing = shards.shards_of(s, ctx.job_id)
        if not existing:
            started = time.monotonic()
            blocks = _blocks(env, int(rows))
            with db.session() as s:
                created = shards.create_shards(s, ctx.job_id, blocks)
            ctx.log(
                f"{len(blocks)} shards of up to {settings.score_shard_rows:,} rows",
                shards=len(blocks),
                shard_rows=settings.score_shard_rows,
                index_s=round(time.monotonic() - started, 3),
                created=created,
                **info,
            )
        else:
            ctx.log(
                f"resuming: {sum(sh.state == ShardState.done for sh in existing)}/{len(existing)} shards done",
                shards=len(existing),
            )
        publish_pending(ctx, env.queue)
        report = ProgressReporter(ctx)
        report(force=True)

        def on_batch() -> None:
            with contextlib.suppress(JobLost):  # ctx.should_stop() is now True: the shard stops and is released
                report()

        drive_units(
            ctx,
            run_claimed=lambda claim: score_shard(env, claim, ctx.should_stop, on_batch=on_batch),
            summary=lambda: report(refresh=True),
            unit="shard",
            units="shards",
            max_attempts=env.max_attempts,
        )
        report(force=True)
        ctx.progress(0.99, "merging shard outputs", force=True)
        result = _merge(ctx, env, spec, rank_by, info)
    except JobLost:
        raise
    except Exception as exc:
        if lost_database_connection(exc):
            raise  # the attempt is given back (workers/tasks.py): keep the shards and parts for the next
        # cancelled or failed: stop outstanding shards, delete partial outputs
        try:
            with db.session() as s:
                shards.cancel_shards(s, ctx.job_id)
        finally:
            remove_scratch(settings, ctx.tenant_id, ctx.job_id)
            directory = job_dir(settings, ctx.tenant_id, ctx.job_id)
            for p in score_files(directory).values():
                artifacts.remove(p)
            artifacts.remove(directory / EXPLAIN_DIR)
        raise
    return result  # the scratch (shard parts) goes once the success is committed (workers/tasks.py)


def _merge(ctx: Any, env: ScoreEnv, spec: dict[str, Any], rank_by: str, info: dict[str, Any]) -> dict[str, Any]:
    with ctx.db.session() as s:
        done = shards.shards_of(s, ctx.job_id)
    if any(sh.state != ShardState.done for sh in done):
        raise RuntimeError("merge started before every shard was done")
    store = env.store
    paths = score_files(ctx.job_dir())
    fmt = spec.get("output", "csv")
    topk = tbl.TopK(int(spec.get("top_k", 100)), rank_by)

    def parts() -> Iterator[tuple[Path, int, int]]:
        for sh in done:
            ctx.check_cancel()
            if sh.output_uri is None:
                raise RuntimeError(f"shard {sh.index} is done but has no output file")
            yield store.path(sh.output_uri), sh.start_row, sh.stop_row

    merged_at = time.monotonic()
    counts = tbl.merge(parts(), env.table_schema, paths["parquet"], paths["csv"] if fmt == "csv" else None, topk)
    merge_s = time.monotonic() - merged_at
    reasons: Counter = Counter()
    samples: list = []
    duplicates = 0
    for sh in done:
        reasons.update(sh.stats.get("invalid_reasons", {}))
        duplicates += sh.stats.get("duplicates", 0)
        samples.extend(sh.stats.get("invalid_samples", [])[: MAX_INVALID_SAMPLES - len(samples)])
    started = min((sh.started_at for sh in done if sh.started_at), default=None)
    finished = max((sh.finished_at for sh in done if sh.finished_at), default=None)
    scoring_s = (finished - started).total_seconds() if started and finished else 0.0
    files = {
        f: {"bytes": plaintext_size(p)}
        for f, p in paths.items()
        if artifacts.exists(p) and (f == "parquet" or fmt == f)
    }
    workers = sorted({sh.worker or "" for sh in done} - {""})
    top = topk.rows()
    explanations = draw_top_k(ctx, env, top[: int(spec.get("explain_top_k") or 0)], rank_by)
    return {
        "model": spec.get("model_name"),
        "version": spec.get("version"),
        "model_version_id": spec["model_version_id"],
        "library_id": spec["library_id"],
        "outputs": env.output_cols,
        "columns": env.score_cols,
        "coverage": env.coverage if any(k.endswith(("_lo", "_hi")) for k in env.extra_keys) else None,
        "rank_by": rank_by,
        "rows": counts["rows"],
        "valid": counts["valid"],
        "invalid": counts["rows"] - counts["valid"],
        "duplicates": duplicates if spec.get("dedupe") else None,
        "invalid_reasons": dict(reasons.most_common()),
        "invalid_samples": samples,
        "top_k": top,
        "explanations": explanations,
        "format": fmt,
        "files": files,
        "shards": {
            "count": len(done),
            "rows_per_shard": ctx.settings.score_shard_rows,
            "attempts": sum(sh.attempts for sh in done),
            "workers": workers or None,
        },
        "scoring_seconds": round(scoring_s, 3),
        "merge_seconds": round(merge_s, 3),
        "molecules_per_s": round(counts["rows"] / scoring_s, 1) if scoring_s > 0 else None,
        "source": info,
    }


# -- the top-K drawings -----------------------------------------------------------------------

EXPLAIN_STEPS = 32


def explained_output(env: ScoreEnv, rank_by: str) -> int:
    """The model output the drawings attribute: rank_by when it is an output, else the first."""
    outputs = env.output_cols
    return outputs.index(rank_by) if rank_by in outputs else 0


def draw_top_k(ctx: Any, env: ScoreEnv, rows: list[dict[str, Any]], rank_by: str) -> list[dict[str, Any]]:
    """Integrated-gradients attributions of the best rows (in rank order), drawn on each
    molecule as explain/{rank}.svg in the job's directory; one entry per row for the
    result. A row that cannot be drawn gets an `error` instead of a file."""
    if not rows:
        return []
    from workers.ml.draw import molecule_svg
    from workers.ml.explain import explain_smiles

    ctx.progress(0.995, f"drawing the top {len(rows)} molecules", force=True)
    target = explained_output(env, rank_by)
    output = env.predictor.output_names[target]
    smiles = [r.get("canonical_smiles") or r["smiles"] for r in rows]
    attributions = explain_smiles(env.predictor, smiles, steps=EXPLAIN_STEPS, target=target)
    directory = ctx.job_dir()
    entries = []
    for rank, (row, smi, attribution) in enumerate(zip(rows, smiles, attributions, strict=True), start=1):
        score = row.get(rank_by)
        entry: dict[str, Any] = {"rank": rank, "row": row["row"], "id": row.get("id"), "smiles": smi, "score": score}
        if "error" in attribution:
            entries.append({**entry, "error": attribution["error"]})
            continue
        try:
            weights = {int(i): float(w) for i, w in attribution["outputs"][output]["atom_weights"].items()}
            legend = f"#{rank}  {rank_by} = {score:.3g}" if isinstance(score, float) else f"#{rank}"
            svg = molecule_svg(smi, atom_weights=weights, legend=legend)
            path = explanation_file(directory, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open_write(path) as fh:
                fh.write(svg.encode("utf-8"))
        except Exception as exc:  # one molecule RDKit cannot draw must not fail the scored job
            log.exception("score job %s: drawing rank %s (row %s) failed", ctx.job_id, rank, row["row"])
            entries.append({**entry, "error": f"{type(exc).__name__}: {exc}"})
            continue
        entries.append(
            {
                **entry,
                "output": output,
                "atom_weights": {str(i): round(w, 4) for i, w in sorted(weights.items())},
                "file": f"{EXPLAIN_DIR}/{rank}.svg",
                "media_type": "image/svg+xml",
                "url": explanation_url(ctx.job_id, rank),
            }
        )
    ctx.log(f"drew the top {len(rows)} molecules with their attributions", explanations=len(entries))
    return entries
