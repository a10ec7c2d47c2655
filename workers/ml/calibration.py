"""Calibration fitted on the validation split and stored with the model version
(config.json "calibration", plain JSON), so nothing is recomputed at predict time.

Regression: split-conformal prediction. Each validation row scores
s = |y - mu| / (sigma + eps) when the model has a spread (an ensemble: sigma = the std of
its members' predictions, eps = 5% of the median validation sigma), else s = |y - mu|.
The sorted scores are stored, so any coverage c can be asked for later: q = the
ceil((n + 1) c)-th smallest of the n scores (the finite-sample rule; when that rank
exceeds n, the largest score is used and coverage is no longer guaranteed), and the
interval is mu +- q (sigma + eps), or mu +- q. Above MAX_SCORES validation rows, evenly
spaced order statistics are stored and the next stored rank at or above the asked one is
used (never narrower).

Classification: temperature scaling. z = the log of the (members') mean probabilities;
T minimises the validation negative log-likelihood of softmax(z / T) (for one model this
is the usual logits / T). Conformal prediction sets use the LAC score 1 - p_true of the
calibrated probabilities: the set at coverage c holds every class with
p >= 1 - q (q as above); an empty set gets the most probable class.

Multilabel: one temperature per label on the log-odds of the mean probability; no sets.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar

MAX_SCORES = 10_000
EPS_FRACTION = 0.05  # eps = this fraction of the median validation spread
PROB_FLOOR = 1e-12
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
ECE_BINS = 15


# --------------------------------------------------------------------------- conformal quantile


def _stored_scores(scores: np.ndarray) -> list[float]:
    """All sorted scores, or MAX_SCORES evenly spaced order statistics of them."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) > MAX_SCORES:
        s = s[np.round(np.linspace(0, len(s) - 1, MAX_SCORES)).astype(np.int64)]
    return [float(v) for v in s]


def conformal_quantile(scores: list[float], n: int, coverage: float) -> float:
    """The ceil((n + 1) c)-th smallest of n calibration scores (stored as `scores`)."""
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
    if not scores:
        return math.inf
    k = min(math.ceil((n + 1) * coverage), n)  # 1-based rank
    stored = len(scores)
    if stored == n:
        return scores[k - 1]
    ranks = 1 + np.round(np.linspace(0, n - 1, stored)).astype(np.int64)
    return scores[int(np.searchsorted(ranks, k, side="left"))]


# --------------------------------------------------------------------------- regression


def fit_regression(
    mean: np.ndarray, y: np.ndarray, names: list[str], spread: np.ndarray | None = None
) -> dict[str, Any]:
    """Conformal scores per target from validation predictions `mean` [N, K], targets `y`
    [N, K] (NaN = missing) in the user's units, and the members' std `spread` [N, K]."""
    mean, y = np.asarray(mean, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out: dict[str, Any] = {"type": "regression", "method": "split_conformal", "normalized": spread is not None}
    scores, counts, eps = {}, {}, {}
    for k, name in enumerate(names):
        m = ~np.isnan(y[:, k])
        err = np.abs(y[m, k] - mean[m, k])
        if spread is not None:
            sigma = np.asarray(spread, dtype=np.float64)[m, k]
            e = EPS_FRACTION * float(np.median(sigma)) if len(sigma) else 0.0
            e = max(e, 1e-12)
            eps[name] = e
            err = err / (sigma + e)
        scores[name], counts[name] = _stored_scores(err), int(m.sum())
    out["scores"], out["n"] = scores, counts
    if spread is not None:
        out["eps"] = eps
    return out


def regression_interval(
    calibration: dict[str, Any], mean: np.ndarray, names: list[str], coverage: float, spread: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) [N, K] at `coverage` around predictions `mean` [N, K]."""
    mean = np.asarray(mean, dtype=np.float64)
    half = np.empty_like(mean)
    for k, name in enumerate(names):
        q = conformal_quantile(calibration["scores"][name], calibration["n"][name], coverage)
        if calibration.get("normalized"):
            if spread is None:
                raise ValueError("this calibration scales by the ensemble spread, which is missing")
            half[:, k] = q * (np.asarray(spread, dtype=np.float64)[:, k] + calibration["eps"][name])
        else:
            half[:, k] = q
    return mean - half, mean + half


# --------------------------------------------------------------------------- probabilities


def class_log_probs(probs: np.ndarray) -> np.ndarray:
    """z = log of (mean) class probabilities, floored so that 0 stays finite."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_FLOOR, 1.0))


def label_log_odds(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), PROB_FLOOR, 1.0 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _softmax_nll(z: np.ndarray, y: np.ndarray, log_t: float) -> float:
    logits = torch.from_numpy(z / math.exp(log_t))
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))


def _sigmoid_nll(z: np.ndarray, y: np.ndarray, log_t: float) -> float:
    logits = torch.from_numpy(z / math.exp(log_t))
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y)))


def _fit_log_temperature(nll: Any) -> float:
    res = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    # keep T = 1 unless scaling actually helps
    return float(res.x) if res.fun < nll(0.0) else 0.0


def fit_classification(probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Temperature and LAC scores from validation (mean) probabilities [N, K] and labels [N]."""
    z, y = class_log_probs(probs), np.asarray(y, dtype=np.int64).reshape(-1)
    t = math.exp(_fit_log_temperature(lambda lt: _softmax_nll(z, y, lt))) if len(y) else 1.0
    calibrated = _softmax(z / t)
    lac = 1.0 - calibrated[np.arange(len(y)), y]
    return {
        "type": "classification",
        "method": "temperature+lac",
        "temperature": t,
        "scores": _stored_scores(lac),
        "n": len(y),
    }


def fit_multilabel(probs: np.ndarray, y: np.ndarray, names: list[str]) -> dict[str, Any]:
    """One temperature per label from validation (mean) probabilities [N, K] and 0/1/NaN targets."""
    z, y = label_log_odds(probs), np.asarray(y, dtype=np.float64)
    temps = []
    for k in range(len(names)):
        m = ~np.isnan(y[:, k])
        zk, yk = z[m, k], y[m, k]
        temps.append(
            math.exp(_fit_log_temperature(lambda lt, zk=zk, yk=yk: _sigmoid_nll(zk, yk, lt))) if m.any() else 1.0
        )
    return {"type": "multilabel", "method": "temperature", "temperature": dict(zip(names, temps, strict=True))}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrate_probabilities(
    calibration: dict[str, Any], probs: np.ndarray, names: list[str] | None = None
) -> np.ndarray:
    """(Mean) probabilities [N, K] -> temperature-calibrated probabilities (float32)."""
    if calibration["type"] == "classification":
        return _softmax(class_log_probs(probs) / calibration["temperature"]).astype(np.float32)
    if calibration["type"] == "multilabel":
        if names is None:
            raise ValueError("multilabel calibration needs the label names")
        t = np.asarray([calibration["temperature"][n] for n in names], dtype=np.float64)
        return (1.0 / (1.0 + np.exp(-label_log_odds(probs) / t))).astype(np.float32)
    raise ValueError(f"{calibration['type']} calibration has no probabilities")


def prediction_sets(calibration: dict[str, Any], probs: np.ndarray, coverage: float) -> list[list[int]]:
    """Conformal (LAC) prediction sets of class indices from calibrated probabilities [N, K]."""
    q = conformal_quantile(calibration["scores"], calibration["n"], coverage)
    probs = np.asarray(probs, dtype=np.float64)
    member = probs >= 1.0 - q
    member[np.arange(len(probs)), probs.argmax(1)] |= ~member.any(1)
    return [np.flatnonzero(row).tolist() for row in member]


# --------------------------------------------------------------------------- quality measures


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Top-label ECE of class probabilities [N, K] against labels [N] (equal-width bins)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y).reshape(-1)
    if len(y) == 0:
        return None
    conf, pred = probs.max(1), probs.argmax(1)
    return _ece(conf, (pred == y).astype(np.float64), bins)


def binary_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE of independent label probabilities against 0/1 targets (NaN ignored), pooled."""
    p, t = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    m = ~np.isnan(t)
    return _ece(p[m], t[m], bins) if m.any() else None


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(float(conf[m].mean()) - float(correct[m].mean()))
    return total / len(conf)
