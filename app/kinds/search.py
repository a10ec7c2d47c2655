"""`search`: hyper-parameter search over a train spec (spec, submit-time check, route, and the
trials table the job page shows). The run is workers/kinds/search.py: an Optuna study kept in
the platform's own database, each trial a unit of work on the shard lease (app/leases.py
SHARDS, one ScoreShard row per trial, index = trial slot) that any worker on the queue takes;
trials report the validation metric every epoch and are pruned early (successive halving or
Hyperband); the best trial is registered as a model version of the search job.

    {"train": {...a train spec...},
     "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": true},
               "hidden_size": {"type": "int", "low": 16, "high": 128, "step": 16},
               "dropout": {"type": "float", "low": 0.0, "high": 0.5},
               "cell": {"type": "categorical", "choices": ["gru", "lstm"]}},
     "budget": {"trials": 12, "time_s": 3600},
     "metric": "rmse", "direction": "minimize", "pruner": "successive_halving"}

A space key is a tunable train field (`lr`, `batch_size`, `weight_decay`, `optimizer`,
`scheduler`, `grad_clip`) or a `model` parameter of the train spec's arch (bare, or as
`model.hidden_size`). Every bad value is a 422 naming its field (`space.lr.low`).
"""

from __future__ import annotations

import math
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.fields import StrictInteger
from app.kinds import KindSpec, Spec, SpecError, SubmitContext, allowed_queue, queue_or_default, register
from app.kinds import train as train_kind
from app.modelconfig import CONFIGS, check_params, user_params
from app.models import ScoreShard

MAX_TRIALS = 200
MAX_CHOICES = 100
TUNABLE_TRAIN_FIELDS = ("lr", "batch_size", "weight_decay", "optimizer", "scheduler", "grad_clip")
# Validation metrics per task and the direction that is better (workers/ml/heads.py metric_modes;
# tests/unit/test_search.py keeps the two in step).
METRIC_DIRECTIONS: dict[str, dict[str, str]] = {
    "classification": {"loss": "minimize", "accuracy": "maximize", "roc_auc": "maximize"},
    "multilabel": {"loss": "minimize", "accuracy": "maximize", "roc_auc": "maximize"},
    "regression": {"loss": "minimize", "rmse": "minimize", "mae": "minimize", "r2": "maximize"},
}
PRUNERS = ("successive_halving", "hyperband", "none")
# Trial states, as the unit rows and the page name them.
# lost: its worker died on every attempt; error: its run raised on every attempt (ScoreShard.error)
TRIAL_STATES = ("waiting", "running", "complete", "pruned", "fail", "skipped", "lost", "error", "cancelled")


class BudgetSpec(Schema):
    trials = StrictInteger(load_default=12, validate=validate.Range(min=1, max=MAX_TRIALS))
    time_s = StrictInteger(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=1, max=30 * 86400),
        metadata={"description": "no trial starts once this many seconds have passed since the search started"},
    )


class SearchSpec(Schema):
    train = fields.Nested(
        train_kind.TrainSpec, required=True, metadata={"description": "the train spec each trial starts from"}
    )
    space = fields.Dict(
        required=True,
        metadata={
            "description": "parameter -> {type: float|int|categorical, low, high, log, step, choices}; "
            "a list is shorthand for categorical choices"
        },
    )
    budget = fields.Nested(BudgetSpec, load_default=lambda: BudgetSpec().load({}))
    metric = fields.String(load_default="loss", metadata={"description": "validation metric to optimise"})
    direction = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(["minimize", "maximize"]))
    pruner = fields.String(load_default="successive_halving", validate=validate.OneOf(PRUNERS))
    min_resource = StrictInteger(
        load_default=1, validate=validate.Range(min=1), metadata={"description": "epochs before a trial may be pruned"}
    )
    reduction_factor = StrictInteger(load_default=3, validate=validate.Range(min=2, max=10))
    queue = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def _spec(self, data: dict[str, Any], **_kw: Any) -> None:
        errors: dict[str, Any] = {}
        loaded = data.get("train")
        if loaded is not None:  # (a bad train spec is reported on its own fields)
            if loaded.get("ensemble", 1) != 1:
                errors["train"] = {"ensemble": ["a search trains single models; leave ensemble at 1"]}
            split = loaded.get("split") or {}
            if split and not split.get("val"):
                errors["train"] = {"split": {"val": ["a search compares trials on a validation split; give val > 0"]}}
            task = loaded["task"]
            metric = data.get("metric", "loss")
            if metric not in METRIC_DIRECTIONS[task]:
                errors["metric"] = [f"a {task} search optimises one of {sorted(METRIC_DIRECTIONS[task])}"]
            space = data.get("space")
            if isinstance(space, dict):
                data["space"], space_errors = normalise_space(space, loaded)
                if space_errors:
                    errors["space"] = space_errors
        if errors:
            raise ValidationError(errors)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def normalise_space(space: dict[str, Any], train: Spec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(space with every entry complete, errors per `space.<name>.<field>`). Each end of a range
    and each choice is checked the way the train spec checks that field."""
    arch = train["arch"]
    model_names = user_params(arch) if arch in CONFIGS else set()
    out: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    if not space:
        return out, {"_schema": ["give at least one parameter to search"]}
    for name, raw in space.items():
        param = name.removeprefix("model.")
        target = "model" if param in model_names and param not in TUNABLE_TRAIN_FIELDS else "train"
        if name.startswith("model.") and param not in model_names:
            target = "unknown"
        if target == "train" and param not in TUNABLE_TRAIN_FIELDS:
            target = "unknown"
        if target == "unknown":
            allowed = sorted({*TUNABLE_TRAIN_FIELDS, *model_names})
            errors[name] = {"_schema": [f"unknown parameter {name!r}; tunable: {', '.join(allowed)}"]}
            continue
        entry, entry_errors = _entry(raw)
        if not entry_errors:
            entry_errors = _check_values(entry, param, target, train)
        if entry_errors:
            errors[name] = entry_errors
        else:
            out[name] = {**entry, "param": param, "target": target}
    return out, errors


def _entry(raw: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    if isinstance(raw, list):
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, dict):
        return {}, {"_schema": ["an object {type, low, high, log, step} or {type: categorical, choices}"]}
    kind = raw.get("type", "categorical" if "choices" in raw else "float")
    errs: dict[str, list[str]] = {}
    if kind not in ("float", "int", "categorical"):
        return {}, {"type": ["must be one of float, int, categorical"]}
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    for extra in sorted(set(raw) - allowed):
        errs[extra] = [f"unknown field for a {kind} parameter; allowed: {', '.join(sorted(allowed))}"]
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            errs["choices"] = ["a non-empty list"]
        elif len(choices) > MAX_CHOICES:
            errs["choices"] = [f"at most {MAX_CHOICES} choices"]
        elif not all(c is None or isinstance(c, str | bool) or _number(c) for c in choices):
            errs["choices"] = ["choices are strings, numbers, booleans or null"]
        elif len({repr(c) for c in choices}) != len(choices):
            errs["choices"] = ["choices must be distinct"]
        return {"type": kind, "choices": choices}, errs
    low, high, log, step = raw.get("low"), raw.get("high"), raw.get("log", False), raw.get("step")
    number = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else _number
    what = "an integer" if kind == "int" else "a finite number"
    for field, value in (("low", low), ("high", high)):
        if value is None:
            errs[field] = ["required"]
        elif not number(value):
            errs[field] = [f"must be {what}"]
    if not isinstance(log, bool):
        errs["log"] = ["must be true or false"]
    if step is not None and (not number(step) or step <= 0):
        errs["step"] = [f"must be {what} > 0"]
    if errs or low is None or high is None:
        return {}, errs
    if low > high:
        errs["high"] = [f"must be >= low ({low})"]
    elif log and low <= 0:
        errs["low"] = ["must be > 0 on a log scale"]
    elif log and step is not None:
        errs["step"] = ["a log-scale range takes no step"]
    return {"type": kind, "low": low, "high": high, "log": log, "step": step}, errs


def _check_values(entry: dict[str, Any], param: str, target: str, train: Spec) -> dict[str, list[str]]:
    """Each end (or choice) must be a value the train spec accepts for that field."""
    if entry["type"] == "categorical":
        where = [(f"choices[{i}]", c) for i, c in enumerate(entry["choices"])]
    else:
        where = [("low", entry["low"]), ("high", entry["high"])]
    errs: dict[str, list[str]] = {}
    field = train_kind.TrainSpec().fields.get(param) if target == "train" else None
    for label, value in where:
        problems: list[str] = []
        if target == "model":
            problems = check_params(train["arch"], {**(train.get("model") or {}), param: value}).get(param, [])
        elif field is not None:
            try:
                field.deserialize(value)
            except ValidationError as exc:
                messages = exc.messages
                problems = [str(m) for m in (messages if isinstance(messages, list) else [messages])]
        if problems:
            key = "choices" if label.startswith("choices") else label
            errs.setdefault(key, []).extend(f"{label}: {p}" if key == "choices" else p for p in problems)
    return errs


def direction_of(spec: Spec) -> str:
    return spec.get("direction") or METRIC_DIRECTIONS[spec["train"]["task"]][spec["metric"]]


def trial_spec(spec: Spec, params: dict[str, Any]) -> Spec:
    """The train spec of one trial: the search's train spec with the trial's parameters put in
    place, monitoring the search metric (so the kept weights are the best by it)."""
    train = {**spec["train"], "model": dict(spec["train"].get("model") or {}), "monitor": spec["metric"]}
    for name, value in params.items():
        entry = spec["space"].get(name, {"target": "train", "param": name})
        if entry["target"] == "model":
            train["model"][entry["param"]] = value
        else:
            train[entry["param"]] = value
    return train


def check(spec: Spec, ctx: SubmitContext) -> Spec:
    """The train spec passes the train kind's own check (dataset, limits, devices), with the
    largest batch/epoch cost any trial may have; the result is stored as the search's train."""
    try:
        train = train_kind.check(spec["train"], ctx)
    except SpecError as exc:
        details = exc.details if isinstance(exc.details, dict) else {}
        inner = details.get("spec", details) if details else {}
        raise SpecError(f"train: {exc.message}", exc.code, {"spec": {"train": inner}}) from exc
    return {**spec, "train": train, "direction": direction_of({**spec, "train": train})}


def route(spec: Spec, settings: Settings) -> str:
    default = settings.gpu_queue if spec["train"]["device"].startswith("cuda") else settings.default_queue
    return allowed_queue("search", queue_or_default(spec, default), settings)


# -- the trials table (job page, result) ---------------------------------------------------


def trials_table(session: Session, job_id: int, spec: Spec) -> dict[str, Any]:
    """Every trial slot of a search as its unit row records it (state, parameters, value, the
    metric per epoch, attempts, worker), the best one marked, and a chart's points."""
    units = session.execute(
        select(
            ScoreShard.index,
            ScoreShard.state,
            ScoreShard.stats,
            ScoreShard.attempts,
            ScoreShard.worker,
            ScoreShard.error,
        )
        .where(ScoreShard.job_id == job_id)
        .order_by(ScoreShard.index)
    ).all()
    direction = spec.get("direction") or "minimize"
    rows = []
    for index, state, stats, attempts, worker, error in units:
        stats = stats or {}
        trial_state = stats.get("state") or {"pending": "waiting", "running": "running"}.get(state.value, state.value)
        if state.value == "failed":
            trial_state = "lost" if (error or "").startswith("worker lost") else "error"
        elif state.value == "cancelled":
            trial_state = "cancelled"
        rows.append(
            {
                "slot": index,
                "trial": stats.get("trial"),
                "state": trial_state,
                "value": stats.get("value"),
                "params": stats.get("params") or {},
                "curve": stats.get("curve") or [],
                "epochs": len(stats.get("curve") or []),
                "attempts": attempts,
                "worker": worker,
                "best": False,
            }
        )
    complete = [r for r in rows if r["state"] == "complete" and _number(r["value"])]
    best = None
    if complete:
        best = (min if direction == "minimize" else max)(complete, key=lambda r: r["value"])
        best["best"] = True
    return {
        "metric": spec.get("metric"),
        "direction": direction,
        "params": list(spec.get("space") or {}),
        "rows": rows,
        "best": best,
        "counts": {s: sum(r["state"] == s for r in rows) for s in TRIAL_STATES if any(r["state"] == s for r in rows)},
        "chart": trial_chart(rows),
    }


def trial_chart(rows: list[dict[str, Any]], width: int = 640, height: int = 220, pad: int = 36) -> dict[str, Any]:
    """Points of a scatter of the metric per trial (the last reported value for a pruned or
    running one), scaled into a width x height SVG box."""
    pts: list[tuple[int, float, dict[str, Any]]] = []
    for r in rows:
        value: Any = r["value"] if _number(r["value"]) else (r["curve"][-1] if r["curve"] else None)
        if _number(value):
            pts.append((r["slot"], float(value), r))
    if not pts:
        return {"points": [], "width": width, "height": height}
    lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
    span = (hi - lo) or 1.0
    n = max(len(rows) - 1, 1)
    points = [
        {
            "x": round(pad + (width - 2 * pad) * slot / n, 1),
            "y": round(height - pad - (height - 2 * pad) * (value - lo) / span, 1),
            "slot": slot,
            "value": value,
            "state": r["state"],
            "best": r["best"],
        }
        for slot, value, r in pts
    ]
    return {"points": points, "width": width, "height": height, "pad": pad, "low": lo, "high": hi}


register(
    KindSpec(
        "search",
        SearchSpec,
        route,
        "search hyper-parameters of a train spec (Optuna, pruned trials) and register the best",
        check=check,
        queues=train_kind.queues,
    )
)
