"""Model cards: what a model version is for and what it is not, what it was trained on and
how well it did, where its predictions can be trusted, who trained it, when, and with which
software. One card per version, as JSON (`build`) and as Markdown (`markdown`).

The written parts (intended use, out-of-scope use, limitations) come from the train spec's
`card` at registration and can be edited later (app/api/cards.py); the worker records the
software versions at training time (`software_versions`); the rest is read from the version,
its dataset, its training job and the audit trail when the card is rendered, so a card never
disagrees with the registry."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, AuditEvent, Dataset, Job, ModelVersion, Tenant, utcnow

TEXT_FIELDS = ("intended_use", "out_of_scope", "limitations")
TEXT_TITLES = {"intended_use": "Intended use", "out_of_scope": "Out-of-scope use", "limitations": "Limitations"}
MAX_TEXT = 10_000
SOFTWARE = ("torch", "rdkit", "medmaas", "numpy", "safetensors")
NOT_WRITTEN = "Not written yet."


def software_versions() -> dict[str, str]:
    """The versions of the software that trains and serves a model: Python and the installed
    distributions in SOFTWARE ("not installed" where absent). Called by the worker when it
    registers a version, so the card says what trained it, not what serves it today."""
    out = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def written(fields: Mapping[str, Any] | None) -> dict[str, str]:
    """The written parts of a card (TEXT_FIELDS) from a spec's `card` or an edit, stripped;
    empty and missing ones left out."""
    out: dict[str, str] = {}
    for name in TEXT_FIELDS:
        value = (fields or {}).get(name)
        if isinstance(value, str) and value.strip():
            out[name] = value.strip()
    return out


def at_registration(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The card column of a version the worker registers: the spec's written card and the
    software versions of this process."""
    return {
        **written(spec.get("card") if isinstance(spec.get("card"), Mapping) else None),
        "software": software_versions(),
    }


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def trained_by(session: Session, mv: ModelVersion, job: Job | None) -> dict[str, Any]:
    """Who submitted the training job: the API key (name, prefix) from the audit trail's
    job.create (or job.clone) entry, and the tenant."""
    tenant = session.get(Tenant, mv.tenant_id)
    out: dict[str, Any] = {"tenant": tenant.name if tenant else None, "key_name": None, "key_prefix": None, "via": None}
    if job is None:
        return out
    rows = session.execute(
        select(
            AuditEvent.action,
            AuditEvent.object_id,
            AuditEvent.key_id,
            AuditEvent.key_prefix,
            AuditEvent.via,
            AuditEvent.details,
        )
        .where(
            AuditEvent.tenant_id == mv.tenant_id,
            AuditEvent.object_type == "job",
            AuditEvent.action.in_(("job.create", "job.clone")),
            AuditEvent.object_id.in_([str(job.id)] + ([str(job.cloned_from)] if job.cloned_from else [])),
            AuditEvent.outcome == "ok",
        )
        .order_by(AuditEvent.id)
    ).all()
    for action, object_id, key_id, prefix, via, details in rows:
        created = ((details or {}).get("created") or {}).get("job") or []
        if (action == "job.create" and object_id == str(job.id)) or (action == "job.clone" and job.id in created):
            name = session.scalar(select(ApiKey.name).where(ApiKey.id == key_id)) if key_id else None
            out.update(key_name=name or None, key_prefix=prefix, via=via)
            break
    return out


def build(session: Session, mv: ModelVersion) -> dict[str, Any]:
    """The version's card as JSON."""
    stored = mv.card if isinstance(mv.card, dict) else {}
    spec = mv.spec if isinstance(mv.spec, dict) else {}
    metrics = mv.metrics if isinstance(mv.metrics, dict) else {}
    job = session.get(Job, mv.job_id) if mv.job_id else None
    dataset = session.get(Dataset, mv.dataset_id) if mv.dataset_id else None
    if dataset is not None and dataset.tenant_id != mv.tenant_id:
        dataset = None
    split: dict[str, Any] = spec["split"] if isinstance(spec.get("split"), dict) else {}
    result = job.result if job is not None and isinstance(job.result, dict) else {}
    training_data = {
        "dataset_id": mv.dataset_id,
        "name": dataset.name if dataset else None,
        "kind": dataset.kind if dataset else None,
        "sha256": mv.dataset_sha256 or (dataset.sha256 if dataset else None),
        "rows": dataset.rows if dataset else None,
        "target": spec.get("target"),
        "split": {
            "method": split.get("method"),
            "fractions": {k: split[k] for k in ("train", "val", "test") if k in split},
            "seed": spec.get("seed"),
        },
        "rows_per_split": result.get("data") if isinstance(result.get("data"), dict) else None,
    }
    per_split = {s: metrics[s] for s in ("train", "val", "test") if isinstance(metrics.get(s), dict)}
    return {
        "model": mv.name,
        "version": mv.version,
        "arch": mv.arch,
        "task": mv.task,
        "input_kind": mv.input_kind,
        "tags": list(mv.tags or []),
        # as written at registration (the spec's card) until someone edits the card
        **{
            name: (stored if stored.get("edited_at") else {**written(spec.get("card")), **stored}).get(name) or None
            for name in TEXT_FIELDS
        },
        "training_data": training_data,
        "training": {
            k: spec.get(k)
            for k in ("epochs", "batch_size", "lr", "optimizer", "model", "ensemble", "init_from")
            if spec.get(k) is not None
        },
        "metrics": per_split,
        "best_epoch": metrics.get("best_epoch"),
        "applicability_domain": metrics.get("domain"),
        "calibration": metrics.get("calibration"),
        "uncertainty": metrics.get("uncertainty"),
        "trained_by": trained_by(session, mv, job),
        "trained_at": _iso(mv.created_at),
        "training_job_id": mv.job_id,
        "software": stored.get("software") or None,
        "edited_at": stored.get("edited_at"),
    }


def edit(session: Session, mv: ModelVersion, changes: Mapping[str, Any]) -> ModelVersion:
    """Set (a string) or clear (null or "") the written parts named in `changes`; commits."""
    card = dict(mv.card if isinstance(mv.card, dict) else {})
    for name in TEXT_FIELDS:
        if name in changes:
            value = changes[name]
            if isinstance(value, str) and value.strip():
                card[name] = value.strip()
            else:
                card.pop(name, None)
    card["edited_at"] = utcnow().isoformat()
    mv.card = card
    session.commit()
    return mv


# -- Markdown ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "—"
    if isinstance(value, list | dict):
        import json

        return json.dumps(value, sort_keys=True)
    return str(value)


def _escape(text: str) -> str:
    """Table cells: pipes and line breaks would break the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> list[str]:
    if not rows:
        return ["—", ""]
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    out += [f"| {_escape(k)} | {_escape(_fmt(v))} |" for k, v in rows]
    return [*out, ""]


def _numbers(section: Any) -> list[tuple[str, Any]]:
    if not isinstance(section, dict):
        return []
    return [(k, v) for k, v in sorted(section.items()) if not isinstance(v, dict | list)]


def markdown(card: Mapping[str, Any]) -> str:
    """The card as a Markdown document."""
    lines = [f"# Model card: {card['model']} v{card['version']}", ""]
    lines += [f"{card['arch']} · {card['task']} · {card['input_kind']} inputs"]
    if card.get("tags"):
        lines += ["", "Tags: " + ", ".join(f"`{t}`" for t in card["tags"])]
    lines.append("")
    for name in TEXT_FIELDS:
        lines += [f"## {TEXT_TITLES[name]}", "", card.get(name) or NOT_WRITTEN, ""]
    data = card["training_data"]
    split = data.get("split") or {}
    lines += ["## Training data", ""]
    lines += _table(
        [
            ("dataset", f"{data.get('name') or '—'} (#{data.get('dataset_id')})" if data.get("dataset_id") else "—"),
            ("sha256", data.get("sha256")),
            ("rows", data.get("rows")),
            ("target", data.get("target")),
            ("split method", split.get("method")),
            ("split fractions", split.get("fractions")),
            ("split seed", split.get("seed")),
            ("rows per split", data.get("rows_per_split")),
        ],
        ("", "value"),
    )
    lines += ["## Metrics per split", ""]
    metrics = card.get("metrics") or {}
    keys = sorted({k for s in metrics.values() for k, v in s.items() if not isinstance(v, dict | list)})
    if keys:
        splits = list(metrics)
        lines += ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        lines += [f"| {k} | " + " | ".join(_fmt(metrics[s].get(k)) for s in splits) + " |" for k in keys]
        lines.append("")
    else:
        lines += ["No metrics were recorded.", ""]
    lines += ["## Applicability domain", ""]
    domain = card.get("applicability_domain")
    if isinstance(domain, dict) and not domain.get("skipped"):
        lines += [
            "Inputs whose nearest training neighbour is closer than the threshold are in domain; "
            "the errors below are measured on the test split.",
            "",
        ]
        lines += _table(_numbers(domain), ("", "value"))
    else:
        reason = domain.get("skipped") if isinstance(domain, dict) else "not measured for this version"
        lines += [f"Not available ({reason}).", ""]
    calibration = card.get("calibration")
    if isinstance(calibration, dict) and calibration and not calibration.get("skipped"):
        lines += ["## Calibration", "", *_table(_numbers(calibration), ("", "value"))]
    lines += ["## Training", ""]
    who = card.get("trained_by") or {}
    key = who.get("key_name") or who.get("key_prefix")
    lines += _table(
        [
            ("trained by", f"key {key} of tenant {who.get('tenant')}" if key else f"tenant {who.get('tenant')}"),
            ("trained at", card.get("trained_at")),
            ("training job", card.get("training_job_id")),
            *sorted((card.get("training") or {}).items()),
        ],
        ("", "value"),
    )
    lines += ["## Software", ""]
    software = card.get("software")
    lines += _table(sorted(software.items()), ("package", "version")) if software else ["Not recorded.", ""]
    return "\n".join(lines).rstrip() + "\n"
