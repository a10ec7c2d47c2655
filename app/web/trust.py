"""What the pages show of a model's trustworthiness and of one explained prediction, as plain
data for the templates: the trust metrics a version stores (faithfulness, uncertainty,
calibration, applicability domain), a prediction's spread, interval, domain flag and drawing,
and a score job's top-K rows with their drawings.

Pure functions over the JSON the workers wrote (ModelVersion.metrics, job results): no Flask,
no RDKit. Unknown keys are shown with a readable label, missing sections are left out (older
versions have none), so the pages keep working as the metrics grow.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

# -- a version's trust metrics -----------------------------------------------------------

TRUST_SECTIONS: dict[str, str] = {
    "faithfulness": "Faithfulness of the attributions",
    "uncertainty": "Uncertainty",
    "calibration": "Calibration",
    "domain": "Applicability domain",
}

# Labels for the keys the workers write (workers/ml/quality.py, workers/ml/explain.py), in the
# order they are shown; any other scalar key follows with its name made readable.
KNOWN_LABELS: dict[str, dict[str, str]] = {
    "faithfulness": {
        "top": "Mean |Δ prediction|, top attributed masked",
        "random": "Mean |Δ prediction|, random masked",
        "ratio": "Ratio top / random (> 1: the attributions point at what matters)",
        "fraction": "Fraction masked",
        "n": "Held-out inputs",
        "method": "Method",
        "split": "Held-out split",
    },
    "uncertainty": {
        "method": "Method",
        "members": "Ensemble members",
        "samples": "Samples",
        "spread_error_spearman": "Spearman ρ, spread vs absolute error (test)",
        "mc_dropout_spread_error_spearman": "Spearman ρ, MC-dropout spread vs absolute error (test)",
        "entropy_error_spearman": "Spearman ρ, entropy vs error (test)",
        "test_mean_std": "Mean spread (test)",
    },
    "calibration": {
        "coverage": "Requested coverage",
        "test_coverage": "Empirical coverage (test)",
        "test_mean_width": "Mean interval width (test)",
        "normalized": "Intervals scaled by the ensemble spread",
        "temperature": "Temperature",
        "test_ece_before": "Expected calibration error before (test)",
        "test_ece_after": "Expected calibration error after (test)",
        "test_set_coverage": "Prediction-set coverage (test)",
        "test_mean_set_size": "Mean prediction-set size (test)",
    },
    "domain": {
        "kind": "Measure",
        "threshold": "Threshold",
        "rule": "Threshold rule",
        "test_in_domain_fraction": "Fraction of test inputs in domain",
        "test_error_in_domain": "Error in domain (test)",
        "test_error_out_of_domain": "Error out of domain (test)",
        "reference_size": "Reference molecules / images",
        "error": "Error measure",
    },
}
PERCENT_KEYS = {"coverage", "test_coverage", "test_set_coverage", "test_in_domain_fraction", "fraction"}


@dataclass
class TrustSection:
    key: str
    title: str
    rows: list[tuple[str, str]]
    highlight: str | None = None  # the one figure that sums the section up


@dataclass
class VersionTrust:
    version: int
    sections: list[TrustSection] = field(default_factory=list)


def readable(key: str) -> str:
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}g}"
    return str(value)


def _show(key: str, value: Any) -> str:
    if key in PERCENT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 1:
        return f"{100 * value:.1f}%"
    if isinstance(value, str):
        return value.replace("_", " ")  # integrated_gradients, error_rate
    return number(value)


def _rows(section: str, data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    labels = KNOWN_LABELS.get(section, {})
    ordered = [k for k in labels if k in data] + sorted(k for k in data if k not in labels)
    rows: list[tuple[str, str]] = []
    for key in ordered:
        value = data[key]
        label = f"{prefix}{labels.get(key, readable(key))}"
        if isinstance(value, dict):  # e.g. per output or per class: one level down, prefixed
            rows.extend(_rows(section, value, f"{label} · "))
        elif isinstance(value, (str, int, float)) and value is not None:
            rows.append((label, _show(key, value)))
    return rows


def _highlight(key: str, data: dict[str, Any]) -> str | None:
    def num(name: str) -> float | None:
        v = data.get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if key == "faithfulness" and (ratio := num("ratio")) is not None:
        return f"Masking the top-attributed inputs changes predictions {ratio:.2f}× as much as masking random ones."
    if key == "uncertainty":
        for name, what in (
            ("spread_error_spearman", "Spread"),
            ("mc_dropout_spread_error_spearman", "MC-dropout spread"),
            ("entropy_error_spearman", "Entropy"),
        ):
            if (rho := num(name)) is not None:
                return f"{what} vs error: Spearman ρ = {rho:.2f} on the test set."
    if key == "calibration":
        wanted, got = num("coverage"), num("test_coverage")
        if wanted is not None and got is not None:
            return f"Intervals asked to cover {100 * wanted:.0f}% covered {100 * got:.1f}% of the test set."
        before, after = num("test_ece_before"), num("test_ece_after")
        if before is not None and after is not None:
            return f"Expected calibration error {before:.3f} → {after:.3f} after temperature scaling."
    if key == "domain" and (inside := num("test_in_domain_fraction")) is not None:
        return f"{100 * inside:.1f}% of the test set is in the applicability domain."
    return None


def trust_sections(metrics: Any) -> list[TrustSection]:
    """The trust sections a version's metrics hold, in a fixed order; absent ones left out."""
    if not isinstance(metrics, dict):
        return []
    out = []
    for key, title in TRUST_SECTIONS.items():
        data = metrics.get(key)
        if isinstance(data, dict) and (rows := _rows(key, data)):
            out.append(TrustSection(key, title, rows, _highlight(key, data)))
    return out


def version_trust(versions: list[Any]) -> list[VersionTrust]:
    """Per version (newest first, as given) the trust sections it has; versions without any are
    left out."""
    out = []
    for mv in versions:
        sections = trust_sections(mv.metrics)
        if sections:
            out.append(VersionTrust(mv.version, sections))
    return out


def core_metrics(metrics: Any) -> dict[str, Any]:
    """The metrics the versions table lists: everything but the trust sections (shown apart)."""
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items() if k not in TRUST_SECTIONS}


# -- one explained prediction -------------------------------------------------------------


@dataclass
class OutputRow:
    name: str
    value: float | None
    std: float | None
    interval: tuple[float, float] | None


@dataclass
class ExplainedItem:
    index: int
    input: str
    smiles: str | None
    error: str | None
    kind: str  # "regression" | "classification"
    rows: list[OutputRow]
    label: str | None
    entropy: float | None
    prediction_set: list[str] | None
    uncertainty_method: str | None
    uncertainty_samples: int | None
    coverage: float | None
    domain: dict[str, Any] | None
    drawing: str | None  # "svg" | "png": the drawing route serves it
    drawn_output: str | None
    weights: list[tuple[str, float]]
    method: str | None = None  # "integrated_gradients" | "grad_cam"
    explanation_error: str | None = None
    other_drawings: list[str] = field(default_factory=list)  # further outputs drawn (multi-output)

    @property
    def has_std(self) -> bool:
        return any(r.std is not None for r in self.rows)

    @property
    def has_interval(self) -> bool:
        return any(r.interval is not None for r in self.rows)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _pair(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = _float(value[0]), _float(value[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def drawing_kind(explanation: Any) -> str | None:
    if not isinstance(explanation, dict):
        return None
    if isinstance(explanation.get("svg"), str) and is_svg(explanation["svg"]):
        return "svg"
    if isinstance(explanation.get("png_base64"), str):
        return "png"
    return None


def explained_item(index: int, pred: Any, shown_input: str | None = None) -> ExplainedItem:
    """One prediction dict of a predict job's result (workers/ml/predict.py's keys) for the page."""
    p = _dict(pred)
    values = p.get("values") if isinstance(p.get("values"), dict) else None
    probabilities = p.get("probabilities") if isinstance(p.get("probabilities"), dict) else None
    numbers = values or probabilities or {}
    unc = _dict(p.get("uncertainty"))
    std = _dict(unc.get("std"))
    interval = _dict(p.get("interval"))
    bounds = _dict(interval.get("values"))
    rows = [
        OutputRow(str(name), _float(v), _float(std.get(name)), _pair(bounds.get(name))) for name, v in numbers.items()
    ]
    label = p.get("label")
    if isinstance(p.get("labels"), list):
        label = ", ".join(str(x) for x in p["labels"]) or "—"
    explanation = _dict(p.get("explanation"))
    weights_raw = _dict(explanation.get("atom_weights"))
    weights = sorted(
        ((str(k), w) for k, v in weights_raw.items() if (w := _float(v)) is not None),
        key=lambda kv: -abs(kv[1]),
    )
    prediction_set = p.get("prediction_set")
    samples = unc.get("samples")
    return ExplainedItem(
        index=index,
        input=shown_input if shown_input is not None else str(p.get("input", "")),
        smiles=p.get("smiles") if isinstance(p.get("smiles"), str) and p.get("smiles") != p.get("input") else None,
        error=str(p["error"]) if p.get("error") else None,
        kind="classification" if probabilities is not None and values is None else "regression",
        rows=rows,
        label=str(label) if label is not None else None,
        entropy=_float(unc.get("entropy")),
        prediction_set=[str(x) for x in prediction_set] if isinstance(prediction_set, list) else None,
        uncertainty_method=str(unc["method"]) if unc.get("method") else None,
        uncertainty_samples=samples if isinstance(samples, int) and not isinstance(samples, bool) else None,
        coverage=_float(interval.get("coverage")),
        domain=p.get("domain") if isinstance(p.get("domain"), dict) else None,
        drawing=drawing_kind(explanation),
        drawn_output=str(explanation["output"]) if explanation.get("output") is not None else None,
        weights=weights[:12],
        method=str(explanation["method"]) if explanation.get("method") else None,
        explanation_error=str(explanation["error"]) if explanation.get("error") else None,
        other_drawings=[
            str(name)
            for name, drawn in _dict(explanation.get("outputs")).items()
            if name != explanation.get("output") and drawing_kind(drawn)
        ],
    )


# -- drawings -----------------------------------------------------------------------------

_SVG_START = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!--.*?-->\s*)*<svg[\s>]", re.S)
_SVG_ACTIVE = re.compile(r"<\s*(script|foreignObject)\b|<[^>]*\son[a-z]+\s*=|javascript:", re.I)


def is_svg(text: str) -> bool:
    """Whether `text` is an SVG document with nothing active in it. The drawings come from our
    worker (RDKit) and are only ever shown through <img>, where a browser runs nothing; this
    check keeps anything else from being served as image/svg+xml at all."""
    return bool(_SVG_START.match(text[:4096])) and not _SVG_ACTIVE.search(text)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def drawing_bytes(explanation: Any, output: str | None = None) -> tuple[bytes, str] | None:
    """(body, media type) of a prediction's drawing (of `output`, for a multi-output model's
    further drawings), or None when it has none (or a malformed one)."""
    if output is not None:
        explanation = _dict(_dict(explanation).get("outputs")).get(output)
    kind = drawing_kind(explanation)
    if kind == "svg":
        return explanation["svg"].encode("utf-8"), "image/svg+xml"
    if kind == "png":
        try:
            raw = base64.b64decode(explanation["png_base64"], validate=True)
        except (binascii.Error, ValueError):
            return None
        return (raw, "image/png") if raw.startswith(PNG_MAGIC) else None
    return None


# -- a score job's top-K ------------------------------------------------------------------

MEDIA_TYPES = {".svg": "image/svg+xml", ".png": "image/png"}


def safe_relative(name: Any) -> str | None:
    """A file name listed in a job result, when it is a plain relative path to an SVG or PNG
    inside the job's directory (no '..', not absolute), else None."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return None
    if any(part in ("", ".", "..") for part in name.split("/")):  # also rejects a leading "/"
        return None
    return name if PurePosixPath(name).suffix.lower() in MEDIA_TYPES else None


def _listed_name(item: dict[str, Any]) -> str | None:
    """The file an `explanations` entry names: its `file` / `path` / `name`, or the part of
    its API `url` after `/files/`."""
    for key in ("file", "path", "name"):
        if (name := safe_relative(item.get(key))) is not None:
            return name
    url = item.get("url")
    if isinstance(url, str) and "/files/" in url:
        return safe_relative(url.split("/files/", 1)[1])
    return None


@dataclass
class Drawings:
    by_row: dict[int, str] = field(default_factory=dict)  # library row -> file in the job directory
    by_rank: dict[int, str] = field(default_factory=dict)  # top-K rank (from 1) -> file
    errors: dict[int, str] = field(default_factory=dict)  # library row -> why it was not drawn

    def names(self) -> set[str]:
        return set(self.by_row.values()) | set(self.by_rank.values())

    def of(self, row: int | None, rank: int) -> str | None:
        if row is not None and row in self.by_row:
            return self.by_row[row]
        return self.by_rank.get(rank)


def explanation_files(result: Any) -> Drawings:
    """The drawings a score result's `explanations` lists, by library row and by rank."""
    items = result.get("explanations") if isinstance(result, dict) else None
    out = Drawings()
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        row, rank = item.get("row"), item.get("rank")
        if item.get("error") and isinstance(row, int) and not isinstance(row, bool):
            out.errors.setdefault(row, str(item["error"]))
        if (name := _listed_name(item)) is None:
            continue
        if isinstance(row, int) and not isinstance(row, bool):
            out.by_row.setdefault(row, name)
        if isinstance(rank, int) and not isinstance(rank, bool):
            out.by_rank.setdefault(rank, name)
    return out


@dataclass
class TopRow:
    rank: int
    row: int | None
    id: str | None
    smiles: str
    score: float | None
    std: float | None
    interval: tuple[float, float] | None
    nn_similarity: float | None
    in_domain: bool | None
    others: list[float | None]
    drawing: str | None  # file name in the job directory
    drawing_error: str | None = None


@dataclass
class TopTable:
    rank_by: str
    others: list[str]
    rows: list[TopRow]
    has_std: bool
    has_interval: bool
    has_domain: bool
    drawings: int


def top_table(result: Any) -> TopTable | None:
    """A succeeded score job's top-K as table rows (None when it kept none)."""
    if not isinstance(result, dict) or not isinstance(result.get("top_k"), list) or not result["top_k"]:
        return None
    outputs = [str(o) for o in result.get("outputs") or []]
    rank_by = str(result.get("rank_by") or (outputs[0] if outputs else "score"))
    others = [o for o in outputs if o != rank_by]
    files = explanation_files(result)
    rows = []
    for i, rec in enumerate(r for r in result["top_k"] if isinstance(r, dict)):
        row = rec.get("row") if isinstance(rec.get("row"), int) else None
        in_domain = rec.get("in_domain")
        if isinstance(in_domain, (int, float)) and not isinstance(in_domain, bool):
            in_domain = None if not math.isfinite(in_domain) else bool(in_domain)  # a 0/1 column
        rows.append(
            TopRow(
                rank=i + 1,
                row=row,
                id=str(rec["id"]) if rec.get("id") not in (None, "") else None,
                smiles=str(rec.get("canonical_smiles") or rec.get("smiles") or ""),
                score=_float(rec.get(rank_by)),
                std=_float(rec.get(f"{rank_by}_std")),
                interval=_pair([rec.get(f"{rank_by}_lo"), rec.get(f"{rank_by}_hi")]),
                nn_similarity=_float(rec.get("nn_similarity")),
                in_domain=in_domain if isinstance(in_domain, bool) else None,
                others=[_float(rec.get(o)) for o in others],
                drawing=files.of(row, i + 1),
                drawing_error=files.errors.get(row) if row is not None else None,
            )
        )
    return TopTable(
        rank_by=rank_by,
        others=others,
        rows=rows,
        has_std=any(r.std is not None for r in rows),
        has_interval=any(r.interval is not None for r in rows),
        has_domain=any(r.nn_similarity is not None or r.in_domain is not None for r in rows),
        drawings=sum(1 for r in rows if r.drawing),
    )
