"""Usage metering: what each tenant used per UTC day (CPU and GPU seconds, predictions,
rows scored, bytes stored), recorded by the workers and the API, read by /api/v1/usage,
the usage page and `medmaas usage`.

Counters are added with one multi-row INSERT ... ON CONFLICT DO UPDATE (quantity = quantity +
excluded.quantity) on PostgreSQL and SQLite alike: atomic per row, so concurrent workers never
lose an increment, and one round trip on the predict path. Rows are written in key order so
two transactions touching the same rows lock them in the same order (no deadlock).

bytes_stored is a gauge: a snapshot replaces the day's rows. Over a date range it reads as the
last snapshot in the range (per model version for group_by=model), not a sum over days.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Date, Float, Integer, String, bindparam, delete, func, select, true, tuple_
from sqlalchemy.orm import Session

from app import artifacts
from app.artifacts import ArtifactStore, job_dir
from app.config import Settings
from app.models import Dataset, Job, ModelVersion, Usage, UsageMetric, UTCDateTime, utcnow
from app.stores.errors import Invalid

GAUGES = frozenset({UsageMetric.bytes_stored})
SECONDS = frozenset({UsageMetric.cpu_seconds, UsageMetric.gpu_seconds})
GROUP_BY = ("day", "model", "metric")
MAX_RANGE_DAYS = 366
DEFAULT_RANGE_DAYS = 30
# Job directories hold results and checkpoints; their scratch space is transient (app.artifacts).
SCRATCH = "scratch"


def today() -> date:
    return datetime.now(UTC).date()


@dataclass(frozen=True)
class Quantity:
    """An amount of one metric, attributed to a model version (model "" / version 0: none)."""

    metric: UsageMetric
    quantity: float
    model: str = ""
    version: int = 0


def model_of(spec: dict[str, Any] | None, result: dict[str, Any] | None = None) -> tuple[str, int]:
    """The model version a job works for, from its spec (predict, score: model_name and
    version; train: model_name, and the version its result registered), or ("", 0)."""
    spec, result = spec or {}, result or {}
    name = spec.get("model_name")
    version = spec.get("version") or result.get("version")
    if not isinstance(name, str) or not name:
        return "", 0
    return name[:128], version if isinstance(version, int) and version > 0 else 0


def _insert(session: Session) -> Any:
    """The dialect's INSERT with on_conflict_do_update (PostgreSQL and SQLite both have it)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(Usage)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(Usage)


_KEY = ("tenant_id", "day", "metric", "model", "version")
_UPSERTS: dict[str, Any] = {}  # the counter upsert of `add`, per dialect


def _rows(tenant_id: int, quantities: Iterable[Quantity], day: date, *, keep_zero: bool) -> list[dict[str, Any]]:
    """One row per key (duplicates summed: an upsert may not touch a row twice), in key order."""
    merged: dict[tuple[UsageMetric, str, int], float] = {}
    for q in quantities:
        if q.quantity < 0 or (q.quantity == 0 and not keep_zero):
            continue
        key = (UsageMetric(q.metric), q.model, q.version)
        merged[key] = merged.get(key, 0.0) + float(q.quantity)
    now = utcnow()
    return [
        {
            "tenant_id": tenant_id,
            "day": day,
            "metric": m,
            "model": model,
            "version": v,
            "quantity": n,
            "updated_at": now,
        }
        for (m, model, v), n in sorted(merged.items())
    ]


def counter_rows(tenant_id: int, quantities: Iterable[Quantity], day: date | None = None) -> list[dict[str, Any]]:
    """The rows `add` upserts: zero and negative amounts skipped, one per key, in key order."""
    rows = _rows(tenant_id, quantities, day or today(), keep_zero=False)
    if any(r["metric"] in GAUGES for r in rows):
        raise ValueError("gauges are set by snapshot_storage, not added")
    return rows


def add(session: Session, tenant_id: int, quantities: Iterable[Quantity], day: date | None = None) -> None:
    """Add counter quantities to the tenant's usage of `day` (default today, UTC); zero and
    negative amounts are skipped. Runs in the caller's transaction."""
    upsert_rows(session, counter_rows(tenant_id, quantities, day))


def upsert_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Add rows from `counter_rows` to the usage table, in the caller's transaction."""
    if not rows:
        return
    # One Core statement per dialect, the rows as parameters: `.values(rows)` compiled a new
    # statement on every call (a third of a worker's CPU per no-op job).
    dialect = session.get_bind().dialect.name
    stmt = _UPSERTS.get(dialect)
    if stmt is None:
        ins = _insert(session)
        stmt = ins.on_conflict_do_update(
            index_elements=list(_KEY),
            set_={"quantity": Usage.quantity + ins.excluded.quantity, "updated_at": ins.excluded.updated_at},
        )
        _UPSERTS[dialect] = stmt
    session.connection().execute(stmt, rows if len(rows) > 1 else rows[0])


def upsert_after(source: Any) -> Any:
    """PostgreSQL: `add` as a CTE of a bigger statement, adding the rows only if `source` (a
    CTE of that statement) yields a row: a job's outcome and its usage in one statement, one
    round trip. Its parameters come from `after_params`; the rows are unnested from arrays
    in the order given (key order: see the module's note on locks)."""
    from sqlalchemy.dialects.postgresql import ARRAY
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    given = (
        func.unnest(
            bindparam("usage_metric", type_=ARRAY(String())),
            bindparam("usage_model", type_=ARRAY(String())),
            bindparam("usage_version", type_=ARRAY(Integer())),
            bindparam("usage_quantity", type_=ARRAY(Float())),
        )
        .table_valued("metric", "model", "version", "quantity")
        .render_derived(name="given")
    )
    rows = select(
        bindparam("usage_tenant", type_=Integer()),
        bindparam("usage_day", type_=Date()),
        given.c.metric,
        given.c.model,
        given.c.version,
        given.c.quantity,
        bindparam("usage_at", type_=UTCDateTime()),
    ).select_from(source.join(given, true()))
    ins = pg_insert(Usage).from_select([*_KEY, "quantity", "updated_at"], rows)
    ins = ins.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={"quantity": Usage.quantity + ins.excluded.quantity, "updated_at": ins.excluded.updated_at},
    )
    return ins.cte("usage")


def after_params(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The parameters of `upsert_after` for rows (at least one) from `counter_rows`."""
    first = rows[0]
    return {
        "usage_tenant": first["tenant_id"],
        "usage_day": first["day"],
        "usage_at": first["updated_at"],
        "usage_metric": [str(r["metric"]) for r in rows],
        "usage_model": [r["model"] for r in rows],
        "usage_version": [r["version"] for r in rows],
        "usage_quantity": [r["quantity"] for r in rows],
    }


# -- bytes stored -------------------------------------------------------------------------------


def tree_bytes(path: Path, skip: frozenset[str] = frozenset()) -> int:
    """Bytes of the files under path (or of the file), not following links; names in `skip`
    (at any depth) are left out. A path that does not exist holds 0 bytes."""
    remote = artifacts.remote_of(path)
    if remote is not None:  # the object store of record, not this host's cache
        return remote.tree_bytes(path, skip)
    try:
        if path.is_file():
            return path.stat().st_size
    except OSError:
        return 0
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # deleted while walking
                continue
    return total


def storage(session: Session, settings: Settings, tenant_id: int) -> list[Quantity]:
    """What the tenant stores now: its datasets (their uploaded bytes) and job results
    (score files, checkpoints; not scratch) unattributed, each model version's bundle
    attributed to that version."""
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.tenant_id == tenant_id))
    found = [Quantity(UsageMetric.bytes_stored, float(datasets or 0))]
    store = ArtifactStore.from_settings(settings)
    versions = session.execute(
        select(ModelVersion.name, ModelVersion.version, ModelVersion.artifact_uri).where(
            ModelVersion.tenant_id == tenant_id
        )
    ).all()
    for name, version, uri in versions:
        try:
            path = store.path(uri)
        except ValueError:  # not a file in this store
            continue
        found.append(Quantity(UsageMetric.bytes_stored, float(tree_bytes(path)), name, version))
    jobs_root = job_dir(settings, tenant_id, 0).parent
    if store.remote is not None:
        live = set(session.scalars(select(Job.id).where(Job.tenant_id == tenant_id)))
        results = sum(
            int(info.get("size") or 0)
            for path, info in store.remote.files(jobs_root).items()
            if (rel := path.relative_to(jobs_root.resolve()).parts)[0].isdigit()
            and int(rel[0]) in live
            and SCRATCH not in rel[:-1]
        )
        found.append(Quantity(UsageMetric.bytes_stored, float(results)))
    elif jobs_root.is_dir():
        live = set(session.scalars(select(Job.id).where(Job.tenant_id == tenant_id)))
        results = sum(
            tree_bytes(Path(entry.path), frozenset({SCRATCH}))
            for entry in os.scandir(jobs_root)
            if entry.is_dir(follow_symlinks=False) and entry.name.isdigit() and int(entry.name) in live
        )
        found.append(Quantity(UsageMetric.bytes_stored, float(results)))
    return found


def snapshot_storage(session: Session, settings: Settings, tenant_id: int, day: date | None = None) -> float:
    """Measure the tenant's bytes stored and make them the day's bytes_stored rows (default
    today): versions measured now are upserted, versions gone since an earlier snapshot of
    the day are deleted. Returns the total."""
    day = day or today()
    rows = _rows(tenant_id, storage(session, settings, tenant_id), day, keep_zero=True)
    keys = [(r["model"], r["version"]) for r in rows]
    session.execute(
        delete(Usage).where(
            Usage.tenant_id == tenant_id,
            Usage.day == day,
            Usage.metric == UsageMetric.bytes_stored,
            tuple_(Usage.model, Usage.version).not_in(keys),
        )
    )
    stmt = _insert(session).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={"quantity": stmt.excluded.quantity, "updated_at": stmt.excluded.updated_at},
    )
    session.execute(stmt)
    return sum(r["quantity"] for r in rows)


# -- reports ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    start: date
    end: date
    group_by: str
    rows: list[dict[str, Any]]
    totals: dict[str, float | int]


def date_range(start: date | None, end: date | None) -> tuple[date, date]:
    """The inclusive range a report covers: `end` defaults to today (UTC), `start` to 29 days
    before `end`. Invalid when start > end or longer than MAX_RANGE_DAYS."""
    end = end or today()
    if start is None:
        days_before = min(DEFAULT_RANGE_DAYS - 1, (end - date.min).days)  # no day before 0001-01-01
        start = end - timedelta(days=days_before)
    if start > end:
        raise Invalid(f"'from' ({start}) is after 'to' ({end})", details={"from": str(start), "to": str(end)})
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise Invalid(
            f"a usage report covers at most {MAX_RANGE_DAYS} days; this range has {(end - start).days + 1}",
            details={"from": str(start), "to": str(end), "max_days": MAX_RANGE_DAYS},
        )
    return start, end


def shown(metric: UsageMetric | str, quantity: float) -> float | int:
    """Seconds to the millisecond; counts and bytes as integers."""
    return round(quantity, 3) if UsageMetric(metric) in SECONDS else round(quantity)


def report(session: Session, tenant_id: int, start: date, end: date, group_by: str) -> Report:
    """The tenant's usage from `start` to `end` (inclusive), grouped by day (each day's totals
    per metric), by model (per model version and metric; model None for what no model caused)
    or by metric; `totals` per metric. Rows are sorted by their group, then metric."""
    if group_by not in GROUP_BY:
        raise Invalid(f"group_by must be one of {', '.join(GROUP_BY)}", details={"group_by": group_by})
    in_range = (Usage.tenant_id == tenant_id, Usage.day >= start, Usage.day <= end)
    counter = Usage.metric.not_in(list(GAUGES))
    last_snapshot = session.scalar(
        select(func.max(Usage.day)).where(*in_range, Usage.metric == UsageMetric.bytes_stored)
    )
    gauge_day = (Usage.metric == UsageMetric.bytes_stored, Usage.day == last_snapshot)
    total = func.sum(Usage.quantity)
    rows: list[dict[str, Any]] = []
    if group_by == "day":
        for day, metric, q in session.execute(
            select(Usage.day, Usage.metric, total).where(*in_range).group_by(Usage.day, Usage.metric)
        ):
            rows.append({"day": day, "metric": UsageMetric(metric).value, "quantity": shown(metric, q)})
        rows.sort(key=lambda r: (r["day"], r["metric"]))
    elif group_by == "model":
        grouped = [
            *session.execute(
                select(Usage.model, Usage.version, Usage.metric, total)
                .where(*in_range, counter)
                .group_by(Usage.model, Usage.version, Usage.metric)
            ),
            *session.execute(
                select(Usage.model, Usage.version, Usage.metric, Usage.quantity).where(*in_range, *gauge_day)
            ),
        ]
        for model, version, metric, q in grouped:
            rows.append(
                {
                    "model": model or None,
                    "version": version or None,
                    "metric": UsageMetric(metric).value,
                    "quantity": shown(metric, q),
                }
            )
        rows.sort(key=lambda r: (r["model"] or "", r["version"] or 0, r["metric"]))
    totals = _totals(session, in_range, counter, gauge_day)
    if group_by == "metric":
        rows = [{"metric": m, "quantity": q} for m, q in totals.items()]
    return Report(start, end, group_by, rows, totals)


def _totals(session: Session, in_range: tuple, counter: Any, gauge_day: tuple) -> dict[str, float | int]:
    sums = dict(
        session.execute(
            select(Usage.metric, func.sum(Usage.quantity)).where(*in_range, counter).group_by(Usage.metric)
        ).all()
    )
    stored = session.scalar(select(func.sum(Usage.quantity)).where(*in_range, *gauge_day))
    if stored is not None:
        sums[UsageMetric.bytes_stored] = stored
    return {m.value: shown(m, float(sums.get(m) or 0.0)) for m in UsageMetric}


# -- CSV ----------------------------------------------------------------------------------------

CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "day": ("day", "metric", "quantity"),
    "model": ("model", "version", "metric", "quantity"),
    "metric": ("metric", "quantity"),
}


def to_csv(rep: Report) -> str:
    """The report's rows as CSV with a header row; text cells a spreadsheet would run as a
    formula are escaped like the score CSVs (app.kinds.score.csv_safe)."""
    import pyarrow as pa

    from app.kinds.score import csv_safe

    columns = CSV_COLUMNS[rep.group_by]
    data = {c: pa.array(["" if r.get(c) is None else str(r[c]) for r in rep.rows], type=pa.string()) for c in columns}
    table = csv_safe(pa.table(data))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*(table.column(c).to_pylist() for c in columns), strict=True))
    return out.getvalue()
