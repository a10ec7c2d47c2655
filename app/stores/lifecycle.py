"""Runs as a lifecycle: the jobs list's tag / model / search filters, comparing several runs
(their metric curves, specs as a diff, final metrics) and cloning a run with changes.

Used by the API (app/api/lifecycle.py), the pages (app/web/lifecycle.py) and, through the
API, the CLI (medmaas/cmd_lifecycle.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, Text, cast, or_, select
from sqlalchemy.orm import Session

from app import dispatch
from app.config import Settings
from app.db import Database
from app.kinds import KindSpec, get_kind
from app.models import Job, JobEvent
from app.stores import jobs as jobs_store
from app.stores.errors import Invalid, NotFound
from app.stores.tags import TAG_PATTERN, TAG_RULE, has_tag

MAX_COMPARE = 20
MAX_SEARCH = 200
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a registry name (the train spec's model_name)
# Metric keys that are bookkeeping, not curves (as the job page's charts: static/js/job.js isCurve).
_NOT_CURVES = frozenset({"epoch", "step", "attempt", "lr", "batch", "global_step", "eta_s"})
_NOT_CURVE = re.compile(r"(^best_|epoch|_s$|_seconds$|_sec$|_time$|^time)")
_SET_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# -- the jobs list's filters ---------------------------------------------------------------


def filtered(
    session: Session, q: Select, *, tag: str | None = None, model: str | None = None, search: str | None = None
) -> Select:
    """A jobs query narrowed to jobs carrying `tag`, training or using model `model` (its
    registry name: a train spec's model_name, a score or predict spec's `name[@...]`), and
    whose spec contains `search` (case-insensitive, anywhere in its JSON text)."""
    if tag:
        q = q.where(has_tag(session, Job.tags, tag))
    if model:
        reference = Job.spec["model"].as_string()
        escaped = model.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        q = q.where(
            or_(
                Job.spec["model_name"].as_string() == model,
                reference == model,
                reference.like(f"{escaped}@%", escape="\\"),
                Job.result["model"].as_string() == model,
            )
        )
    if search:
        q = q.where(cast(Job.spec, Text).icontains(search, autoescape=True))
    return q


def list_filters(values: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The tag, model and search filters of a jobs list request (the pages' query string):
    (the valid ones, a sentence about the first invalid one or None)."""
    out: dict[str, str] = {}
    problem = None
    tag = (values.get("tag") or "").strip()
    if tag:
        if re.match(TAG_PATTERN, tag):
            out["tag"] = tag
        else:
            problem = f"Invalid tag {tag!r}: {TAG_RULE}"
    model = (values.get("model") or "").strip()
    if model:
        if re.match(MODEL_PATTERN, model):
            out["model"] = model
        else:
            problem = f"Invalid model name {model!r}"
    search = (values.get("search") or "").strip()
    if search:
        out["search"] = search[:MAX_SEARCH]
    return out, problem


# -- compare -------------------------------------------------------------------------------


def is_curve(key: str) -> bool:
    return key not in _NOT_CURVES and not _NOT_CURVE.search(key)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": [1, 2]}; an empty dict stays a value."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key in value:
            out.update(flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value} if prefix else {}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


IDS_PATTERN = rf"^[0-9]{{1,10}}(,[0-9]{{1,10}}){{0,{MAX_COMPARE - 1}}}$"


def parse_ids(raw: str | list[str], field: str = "ids") -> list[int]:
    """ "1,2,3" (or repeated values) -> [1, 2, 3]: up to MAX_COMPARE job ids, in order, repeats
    dropped; Invalid naming `field` when there are none, too many or a non-number. An id no
    job can have is a NotFound like any unknown job."""
    parts = [p.strip() for item in ([raw] if isinstance(raw, str) else raw) for p in item.split(",") if p.strip()]
    ids: list[int] = []
    for part in parts:
        if not (part.isascii() and part.isdigit()):
            raise Invalid(
                f"{field}: {part!r} is not a job id", "validation_error", {field: [f"not a job id: {part!r}"]}
            )
        if not 1 <= int(part) <= 2**31 - 1:
            raise NotFound(f"Job {part} not found")
        if int(part) not in ids:
            ids.append(int(part))
    if not 1 <= len(ids) <= MAX_COMPARE:
        message = f"Pick 1 to {MAX_COMPARE} jobs to compare (got {len(ids)})"
        raise Invalid(message, "validation_error", {field: [message]})
    return ids


SLOTS_PATTERN = r"^[0-9]{1,6}(,[0-9]{1,6}){0,99}$"


def parse_slots(raw: str | list[str] | None) -> list[int] | None:
    """Trial slots "0,3,5" (or repeated values) -> [0, 3, 5], repeats dropped; None (every
    trial) when none are given; Invalid naming `slots` for a non-number."""
    parts = [p.strip() for item in ([raw] if isinstance(raw, str) else raw or []) for p in item.split(",") if p.strip()]
    slots: list[int] = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 6:
            raise Invalid(
                f"slots: {part!r} is not a trial slot", "validation_error", {"slots": [f"not a slot: {part!r}"]}
            )
        if int(part) not in slots:
            slots.append(int(part))
    return slots or None


def _curves(session: Session, job_ids: list[int]) -> dict[int, dict[str, list[list[float]]]]:
    """Per job, per curve metric: [[x, y], ...] from its metric events, x the epoch (or step,
    or the event's position), later events for the same x replacing earlier ones (a resumed
    attempt re-reports an epoch)."""
    rows = session.execute(
        select(JobEvent.job_id, JobEvent.data)
        .where(JobEvent.job_id.in_(job_ids), JobEvent.type == "metric")
        .order_by(JobEvent.job_id, JobEvent.seq)
    ).all()
    points: dict[int, dict[str, dict[float, float]]] = {i: {} for i in job_ids}
    counts: dict[int, int] = dict.fromkeys(job_ids, 0)
    for job_id, data in rows:
        if not isinstance(data, dict):
            continue
        counts[job_id] += 1
        x = next((data[k] for k in ("epoch", "step") if _number(data.get(k))), counts[job_id])
        for key, value in data.items():
            if _number(value) and is_curve(key) and value == value:  # NaN is no point
                points[job_id].setdefault(key, {})[x] = value
    return {
        job_id: {key: [[x, y] for x, y in sorted(series.items())] for key, series in sorted(per_key.items())}
        for job_id, per_key in points.items()
    }


def final_metrics(job: Job, curves: dict[str, list[list[float]]]) -> dict[str, Any]:
    """A run's final numbers: its result's `metrics` (train: val.*, test.*, calibration.*,
    ...), flattened to numbers; for a run without them, the last value of each curve."""
    result = job.result if isinstance(job.result, dict) else {}
    metrics = result.get("metrics")
    if isinstance(metrics, dict) and metrics:
        return {k: v for k, v in flatten(metrics).items() if _number(v)}
    return {key: series[-1][1] for key, series in curves.items() if series}


def _rows(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({k for v in values for k in v})
    out = []
    for key in keys:
        column = [v.get(key) for v in values]
        distinct = {
            json.dumps(c, sort_keys=True, default=str) if key in v else "\0missing"
            for c, v in zip(column, values, strict=True)
        }
        out.append({"key": key, "values": column, "differs": len(distinct) > 1})
    return out


def compare(session: Session, tenant_id: int, job_ids: list[int]) -> dict[str, Any]:
    """Several of the tenant's runs side by side: {"jobs": [{id, kind, state, model, tags,
    created_at, cloned_from, curves: {metric: [[x, y], ...]}}], "curve_keys", "metrics":
    [{key, values (one per job, None where absent), differs}], "spec": the same over the
    flattened specs}. A job of another tenant is a 404 naming it."""
    jobs = [jobs_store.get(session, tenant_id, job_id) for job_id in job_ids]
    curves = _curves(session, job_ids)
    finals = [final_metrics(job, curves[job.id]) for job in jobs]
    specs = [flatten(job.spec or {}) for job in jobs]
    items = []
    for job in jobs:
        spec = job.spec or {}
        model = spec.get("model_name") if isinstance(spec.get("model_name"), str) else None
        if model is None and isinstance(spec.get("model"), str):
            model = spec["model"]
        items.append(
            {
                "id": job.id,
                "label": f"#{job.id}",
                "kind": job.kind,
                "state": job.state.value,
                "model": model,
                "tags": list(job.tags or []),
                "cloned_from": job.cloned_from,
                "created_at": job.created_at.isoformat(),
                "curves": curves[job.id],
            }
        )
    return {
        "jobs": items,
        "curve_keys": sorted({k for c in curves.values() for k in c}),
        "metrics": _rows(finals),
        "spec": _rows(specs),
    }


def compare_trials(session: Session, tenant_id: int, job_id: int, slots: list[int] | None = None) -> dict[str, Any]:
    """A hyper-parameter search's trials side by side, in compare's shape: one item per trial
    (its `id` the slot, `label` "trial N"), its curve of the search metric per epoch, its
    final value and epochs, and its parameters as the spec rows. `slots` picks trials (all
    when None); NotFound for a job that is not the tenant's search or an unknown slot."""
    job = jobs_store.get(session, tenant_id, job_id)
    if job.kind != "search":
        raise NotFound(f"Job {job_id} is a {job.kind} job, not a search; it has no trials")
    from app.kinds.search import trials_table  # the search kind's own view of its trial units

    table = trials_table(session, job.id, job.spec or {})
    rows = table["rows"]
    if slots is not None:
        by_slot = {r["slot"]: r for r in rows}
        missing = [s for s in slots if s not in by_slot]
        if missing:
            raise NotFound(f"Search {job_id} has no trial slot {missing[0]}")
        rows = [by_slot[s] for s in slots]
    metric = str(table.get("metric") or "value")
    items, finals, params = [], [], []
    for r in rows:
        curve = [v for v in r.get("curve") or [] if _number(v)]
        items.append(
            {
                "id": r["slot"],
                "label": f"trial {r['trial'] if r.get('trial') is not None else r['slot']}"
                + (" (best)" if r.get("best") else ""),
                "kind": "trial",
                "state": r["state"],
                "model": None,
                "tags": [],
                "cloned_from": None,
                "created_at": job.created_at.isoformat(),
                "curves": {metric: [[i + 1, v] for i, v in enumerate(curve)]} if curve else {},
            }
        )
        finals.append({k: v for k, v in ((metric, r.get("value")), ("epochs", r.get("epochs"))) if _number(v)})
        params.append(flatten(r.get("params") or {}))
    return {
        "search_id": job.id,
        "jobs": items,
        "curve_keys": [metric] if any(i["curves"] for i in items) else [],
        "metrics": _rows(finals),
        "spec": _rows(params),
    }


# -- clone ---------------------------------------------------------------------------------


def submittable_spec(kind: KindSpec, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A stored (normalised) spec as a new submission takes it: the fields the kind's schema
    declares, without what its submit check added (dataset_sha256, resolved ids, notes)."""
    declared = kind.schema().fields
    return {k: v for k, v in spec.items() if k in declared and not declared[k].dump_only}


def apply_sets(kind: KindSpec, spec: dict[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """`{"epochs": 30, "model.hidden_size": 128}` applied to a copy of `spec`: dotted paths
    set nested keys (creating objects on the way). `params.x` is `model.x` for kinds whose
    `model` is an object of hyper-parameters (train: `medmaas train --param`)."""
    out = json.loads(json.dumps(spec))
    for path, value in sets.items():
        if not isinstance(path, str) or not _SET_PATH.match(path):
            message = f"{path!r} is not a spec path (dotted names, e.g. epochs or model.hidden_size)"
            raise Invalid(message, "validation_error", {"set": [message]})
        parts = path.split(".")
        if parts[0] == "params" and "params" not in kind.schema().fields:
            parts[0] = "model"
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                message = f"cannot set {path}: {where} is {json.dumps(child)}, not an object"
                raise Invalid(message, "validation_error", {"set": [message]})
            node = child
        node[parts[-1]] = value
    return out


def clone(
    session: Session,
    celery: Any,
    db: Database,
    settings: Settings,
    tenant_id: int,
    job_id: int,
    *,
    sets: Mapping[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    priority: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Submit a new job of the same kind as job `job_id`: its spec (or `spec`, an edited
    copy), with `sets` applied, validated like any submission (422 naming the field). The new
    job records `cloned_from`; commit, then publish. Returns (job, created)."""
    source = jobs_store.get(session, tenant_id, job_id)
    kind = get_kind(source.kind)
    if kind is None or not kind.submittable:
        message = f"Job {job_id} is a {source.kind} job; that kind cannot be submitted again"
        raise Invalid(message, "not_clonable", {"job_id": job_id})
    base = spec if spec is not None else submittable_spec(kind, source.spec or {})
    edited = apply_sets(kind, base, sets or {})
    job, created = jobs_store.create(
        session,
        settings,
        tenant_id,
        source.kind,
        edited,
        priority=source.priority if priority is None else priority,
        max_attempts=source.max_attempts,
        idempotency_key=idempotency_key,
    )
    if created:
        job.cloned_from = source.id
        session.commit()
        dispatch.publish_jobs(celery, db, [(job.id, job.queue)], stamp=False)
    return job, created
