"""The post-fit quality package of a trained model (single or Ensemble): what its version
stores to be trusted, fitted on the validation split, and how well it holds on the test
split.

- calibration (config["calibration"]): workers/ml/calibration.py, fitted on validation.
- domain (config["domain"]) and reference (reference.safetensors): workers/ml/domain.py,
  threshold chosen on validation.
- metrics, merged into the version's metrics, all on the test split:
  uncertainty: the Spearman correlation between the predicted spread (ensemble std; for
  classification the std of the predicted class's probability) and the absolute error
  (regression |y - mu|, classification 1 - p(true class), multilabel |p - y|), averaged
  over targets; None without a spread. Single models with dropout also get the same
  figure for MC-dropout spread; classification also for the entropy.
  calibration: regression interval coverage and mean width at `coverage`; classification
  ECE before/after temperature scaling and conformal set coverage.
  domain: the threshold, the fraction of test inputs in domain, and the test error (MAE for
  regression, error rate for classification/multilabel) in and out of domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from . import calibration as cal
from . import domain as dom
from .data import BatchDataset, PreparedData, length_buckets
from .ensemble import dropout_rate, mc_dropout, member_outputs, members_of
from .heads import ClassificationHead, Head, MultilabelHead, RegressionHead
from .training import _autocast, autocast_dtype_for, move_inputs, resolve_device

BATCH_SIZE = 512
MC_SAMPLES = 20


@dataclass
class Package:
    calibration: dict[str, Any] | None
    domain: dict[str, Any] | None
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitOutputs:
    """One split's predictions: members' user-facing values [M, N, K], targets (user units
    for regression), optional MC samples [T, N, K] and image embeddings [N, D]."""

    members: np.ndarray
    targets: np.ndarray
    mc: np.ndarray | None = None
    embeddings: torch.Tensor | None = None

    @property
    def mean(self) -> np.ndarray:
        return self.members[0] if len(self.members) == 1 else self.members.mean(0)

    @property
    def spread(self) -> np.ndarray | None:
        return self.members.std(0) if len(self.members) > 1 else None


def _names(head: Head) -> list[str]:
    if isinstance(head, ClassificationHead):
        return head.class_names
    if isinstance(head, MultilabelHead):
        return head.label_names
    return head.output_names


@torch.inference_mode()
def split_outputs(
    model: nn.Module,
    dataset: BatchDataset,
    head: Head,
    device: torch.device,
    *,
    mc_samples: int = 0,
    embed: bool = False,
    rows: np.ndarray | None = None,
) -> SplitOutputs:
    """Predictions of every member over `dataset` (or its `rows`), in dataset order."""
    amp = autocast_dtype_for(device)
    index = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    lengths = getattr(dataset, "lengths", None)
    batches = (
        length_buckets(np.asarray(lengths)[index], BATCH_SIZE)
        if lengths is not None
        else [np.arange(s, min(s + BATCH_SIZE, len(index))) for s in range(0, len(index), BATCH_SIZE)]
    )
    raw: list[tuple[np.ndarray, np.ndarray]] = []
    mc: list[np.ndarray] = []
    emb: list[torch.Tensor] = []
    targets: list[np.ndarray] = []
    for b in batches:
        inputs, y = dataset.__getitems__(index[b].tolist())
        inputs = move_inputs(model, inputs, device)
        with _autocast(device, amp):
            if embed:
                with dom.capture_embeddings(model) as captured:
                    out = member_outputs(model, *inputs)
                emb.append(captured[0])
            else:
                out = member_outputs(model, *inputs)
            if mc_samples:
                with mc_dropout(model):
                    mc.append(
                        torch.cat([member_outputs(model, *inputs).float() for _ in range(mc_samples)]).cpu().numpy()
                    )
        raw.append((b, out.float().cpu().numpy()))
        targets.append(y.numpy())
    m, k = len(members_of(model)), head.num_outputs
    det = np.empty((m, len(index), k), dtype=np.float32)
    for b, out_b in raw:
        det[:, b] = out_b
    order = np.concatenate([b for b, _ in raw]) if raw else np.zeros(0, dtype=np.int64)
    y_all = np.empty((len(index), *targets[0].shape[1:]), dtype=targets[0].dtype) if targets else np.zeros(0)
    if targets:
        y_all[order] = np.concatenate(targets)
    result = SplitOutputs(_transform(head, det), _user_targets(head, y_all))
    if mc:
        mc_raw = np.empty((mc[0].shape[0], len(index), k), dtype=np.float32)
        for (b, _), s in zip(raw, mc, strict=True):
            mc_raw[:, b] = s
        result.mc = _transform(head, mc_raw)
    if emb:
        e = torch.cat(emb)
        result.embeddings = torch.empty_like(e)
        result.embeddings[torch.from_numpy(order).to(e.device)] = e
    return result


def _transform(head: Head, raw: np.ndarray) -> np.ndarray:
    s, n, k = raw.shape
    return head.transform(raw.reshape(s * n, k)).reshape(s, n, k)


def _user_targets(head: Head, y: np.ndarray) -> np.ndarray:
    if isinstance(head, RegressionHead):
        return np.asarray(y, dtype=np.float64) * head.std + head.mean
    return y


# --------------------------------------------------------------------------- calibration


def fit_calibration(head: Head, val: SplitOutputs) -> dict[str, Any]:
    if isinstance(head, RegressionHead):
        return cal.fit_regression(val.mean, val.targets, head.target_names, val.spread)
    if isinstance(head, ClassificationHead):
        return cal.fit_classification(val.mean, val.targets)
    return cal.fit_multilabel(val.mean, val.targets, _names(head))


def calibrated(head: Head, calibration: dict[str, Any], out: SplitOutputs) -> np.ndarray:
    if isinstance(head, RegressionHead):
        return out.mean
    return cal.calibrate_probabilities(calibration, out.mean, _names(head))


def calibration_metrics(head: Head, calibration: dict[str, Any], test: SplitOutputs, coverage: float) -> dict[str, Any]:
    y = test.targets
    if isinstance(head, RegressionHead):
        lo, hi = cal.regression_interval(calibration, test.mean, head.target_names, coverage, test.spread)
        m = ~np.isnan(y)
        inside = (lo <= y) & (y <= hi)
        return {
            "coverage": coverage,
            "test_coverage": float(inside[m].mean()) if m.any() else None,
            "test_mean_width": float((hi - lo)[m].mean()) if m.any() else None,
            "normalized": bool(calibration.get("normalized")),
        }
    probs = calibrated(head, calibration, test)
    if isinstance(head, ClassificationHead):
        sets = cal.prediction_sets(calibration, probs, coverage)
        labels = np.asarray(y).reshape(-1)
        return {
            "coverage": coverage,
            "temperature": calibration["temperature"],
            "test_ece_before": cal.expected_calibration_error(test.mean, labels),
            "test_ece_after": cal.expected_calibration_error(probs, labels),
            "test_set_coverage": float(np.mean([t in s for t, s in zip(labels, sets, strict=True)])) if sets else None,
            "test_mean_set_size": float(np.mean([len(s) for s in sets])) if sets else None,
        }
    return {
        "temperature": calibration["temperature"],
        "test_ece_before": cal.binary_calibration_error(test.mean, y),
        "test_ece_after": cal.binary_calibration_error(probs, y),
    }


# --------------------------------------------------------------------------- uncertainty


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    m = np.isfinite(a) & np.isfinite(b)
    if m.sum() < 3 or np.ptp(a[m]) == 0 or np.ptp(b[m]) == 0:
        return None
    rho = float(spearmanr(a[m], b[m]).statistic)
    return rho if np.isfinite(rho) else None


def _mean_present(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def spread_error_spearman(head: Head, values: np.ndarray, spread: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman(spread, absolute error) on one split, averaged over targets/labels."""
    if isinstance(head, ClassificationHead):
        labels = np.asarray(y).reshape(-1).astype(np.int64)
        rows = np.arange(len(labels))
        return _spearman(spread[rows, values.argmax(1)], 1.0 - values[rows, labels])
    err = np.abs(values - np.asarray(y, dtype=np.float64))
    return _mean_present([_spearman(spread[:, k], err[:, k]) for k in range(values.shape[1])])


def uncertainty_metrics(head: Head, test: SplitOutputs, values: np.ndarray, members: int) -> dict[str, Any]:
    spread = test.spread
    out: dict[str, Any] = {
        "method": "ensemble" if spread is not None else None,
        "members": members,
        "spread_error_spearman": None if spread is None else spread_error_spearman(head, values, spread, test.targets),
    }
    if test.mc is not None:
        out["mc_samples"] = len(test.mc)
        out["mc_dropout_spread_error_spearman"] = spread_error_spearman(head, values, test.mc.std(0), test.targets)
    if isinstance(head, ClassificationHead):
        p = np.clip(values.astype(np.float64), 1e-12, 1.0)
        entropy = -(p * np.log(p)).sum(1)
        labels = np.asarray(test.targets).reshape(-1).astype(np.int64)
        out["entropy_error_spearman"] = _spearman(entropy, 1.0 - values[np.arange(len(labels)), labels])
    return out


# --------------------------------------------------------------------------- domain


def row_errors(head: Head, values: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row test error: MAE over targets (regression), 0/1 misclassification, or the
    mean 0/1 error over the present labels (multilabel)."""
    if isinstance(head, ClassificationHead):
        return (values.argmax(1) != np.asarray(y).reshape(-1)).astype(np.float64)
    y = np.asarray(y, dtype=np.float64)
    err = np.abs(values - y) if isinstance(head, RegressionHead) else ((values >= 0.5) != (y >= 0.5)).astype(np.float64)
    err[np.isnan(y)] = np.nan
    with np.errstate(all="ignore"):
        return np.nanmean(err, axis=1)


def domain_metrics(threshold: float, inside: np.ndarray, errors: np.ndarray, error_name: str) -> dict[str, Any]:
    def mean(mask: np.ndarray) -> float | None:
        e = errors[mask]
        e = e[np.isfinite(e)]
        return float(e.mean()) if len(e) else None

    return {
        "threshold": threshold,
        "test_in_domain_fraction": float(inside.mean()) if len(inside) else None,
        "test_error_in_domain": mean(inside),
        "test_error_out_of_domain": mean(~inside),
        "error": error_name,
    }


def _smiles_domain(
    data: PreparedData, device: torch.device
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dom.FingerprintIndex]:
    train = data.texts["train"]
    pick = dom.subsample(len(train), dom.MAX_FINGERPRINTS)
    ref = dom.morgan_packed([train[i] for i in pick])
    index = dom.FingerprintIndex(ref, device)
    threshold = dom.similarity_threshold(index.nearest(dom.morgan_packed(data.texts["val"])))
    return dom.smiles_config(threshold, len(pick), len(train)), {"fingerprints": torch.from_numpy(ref)}, index


def _embeddings(out: SplitOutputs) -> torch.Tensor:
    if out.embeddings is None:
        raise ValueError("image embeddings were not captured")
    return out.embeddings


def _image_domain(
    model: nn.Module, data: PreparedData, device: torch.device, val: SplitOutputs
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor]:
    pick = dom.subsample(len(data.train), dom.MAX_EMBEDDINGS)
    ref = _embeddings(split_outputs(model, data.train, data.head, device, embed=True, rows=pick))
    threshold = dom.distance_threshold(dom.nearest_distance(_embeddings(val), ref))
    return dom.image_config(threshold, len(pick), len(data.train)), {"embeddings": ref.float().cpu()}, ref


# --------------------------------------------------------------------------- package


def package(model: nn.Module, data: PreparedData, device: torch.device | str, *, coverage: float = 0.9) -> Package:
    """Calibration, domain reference and test-split quality metrics for a trained model."""
    device = resolve_device(device) if isinstance(device, str) else device
    model = model.to(device).eval()
    head, kind = data.head, data.input["kind"]
    members = len(members_of(model))
    if data.val is None or len(data.val) == 0:
        reason = "no validation split to calibrate on"
        return Package(None, None, metrics={"calibration": {"skipped": reason}, "domain": {"skipped": reason}})
    embed = kind == "image"
    mc_samples = MC_SAMPLES if members == 1 and dropout_rate(model) > 0 else 0
    val = split_outputs(model, data.val, head, device, embed=embed)
    calibration = fit_calibration(head, val)
    domain_cfg: dict[str, Any] | None = None
    reference: dict[str, torch.Tensor] = {}
    fingerprints: dom.FingerprintIndex | None = None
    embeddings: torch.Tensor | None = None
    if kind == "smiles" and data.texts.get("train") and data.texts.get("val"):
        domain_cfg, reference, fingerprints = _smiles_domain(data, device)
    elif kind == "image":
        domain_cfg, reference, embeddings = _image_domain(model, data, device, val)
    metrics: dict[str, Any] = {}
    if data.test is not None and len(data.test):
        test = split_outputs(model, data.test, head, device, mc_samples=mc_samples, embed=embed)
        values = calibrated(head, calibration, test)
        metrics["uncertainty"] = uncertainty_metrics(head, test, values, members)
        metrics["calibration"] = calibration_metrics(head, calibration, test, coverage)
        inside: np.ndarray | None = None
        if domain_cfg is not None and fingerprints is not None:
            inside = fingerprints.nearest(dom.morgan_packed(data.texts["test"])) >= float(domain_cfg["threshold"])
        elif domain_cfg is not None and embeddings is not None:
            inside = dom.nearest_distance(_embeddings(test), embeddings) <= float(domain_cfg["threshold"])
        if domain_cfg is not None and inside is not None:
            error_name = "mae" if isinstance(head, RegressionHead) else "error_rate"
            errors = row_errors(head, values, test.targets)
            metrics["domain"] = domain_metrics(float(domain_cfg["threshold"]), inside, errors, error_name)
    return Package(calibration, domain_cfg, reference, metrics)
