"""Prediction heads: loss, metrics and user-facing outputs for each task type.

A head owns everything that depends on what the targets mean: how raw targets become
training tensors, the loss, the metrics (in the user's units), and how raw model
outputs become predictions. Missing targets (NaN) in multilabel/regression data are
masked out of the loss and metrics, as chemprop does for sparse assay panels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

# Whether a metric improves downwards (losses, errors) or upwards (accuracy, AUC).
MetricMode = Literal["min", "max"]


def _auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC, or None where it is undefined (only one class present)."""
    if y_true.size == 0 or y_true.min() == y_true.max():
        return None
    return float(roc_auc_score(y_true, score))


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


class Head:
    name = ""
    primary_metric = ""
    # Direction of every metric this head reports (for early stopping / model selection).
    metric_modes: ClassVar[dict[str, MetricMode]] = {"loss": "min"}

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    @property
    def output_names(self) -> list[str]:
        """Column names of `transform`'s output (class probabilities, values, ...)."""
        raise NotImplementedError

    def encode_targets(self, y: np.ndarray) -> torch.Tensor:
        """Raw targets -> the tensor the loss expects."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        """Metrics from raw outputs and encoded targets, reported in the user's units."""
        raise NotImplementedError

    def transform(self, outputs: np.ndarray) -> np.ndarray:
        """Raw outputs [N, K] -> user-facing numbers [N, len(output_names)]."""
        raise NotImplementedError

    def predictions(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Head:
        kind = d["type"]
        if kind == "classification":
            return ClassificationHead(d["class_names"])
        if kind == "multilabel":
            return MultilabelHead(d["label_names"])
        if kind == "regression":
            return RegressionHead(d["target_names"], d.get("mean"), d.get("std"))
        raise ValueError(f"unknown task {kind!r}")


class ClassificationHead(Head):
    """Single-label multi-class (binary included): softmax + cross-entropy."""

    name = "classification"
    primary_metric = "roc_auc"
    metric_modes: ClassVar[dict[str, MetricMode]] = {"loss": "min", "accuracy": "max", "roc_auc": "max"}

    def __init__(self, class_names: list[str]) -> None:
        if len(class_names) < 2:
            raise ValueError("classification needs at least two classes")
        self.class_names = [str(c) for c in class_names]

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    @property
    def output_names(self) -> list[str]:
        return [f"p_{c}" for c in self.class_names]

    def encode_targets(self, y: np.ndarray) -> torch.Tensor:
        y = np.asarray(y).reshape(len(y), -1)
        if y.shape[1] != 1:
            raise ValueError(f"classification expects one label per row, got shape {y.shape}")
        y = y[:, 0].astype(np.int64)
        if len(y) and (y.min() < 0 or y.max() >= self.num_outputs):
            raise ValueError(f"class index out of range 0..{self.num_outputs - 1}")
        return torch.from_numpy(y)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def transform(self, outputs: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.as_tensor(outputs, dtype=torch.float32), dim=1).numpy()

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        probs, y = self.transform(outputs), np.asarray(targets)
        # Macro one-vs-rest AUC over the classes present with both positives and
        # negatives; for two classes this equals the usual binary AUC.
        aucs = [_auc((y == k).astype(np.int64), probs[:, k]) for k in range(self.num_outputs)]
        return {"accuracy": float((probs.argmax(1) == y).mean()) if len(y) else None, "roc_auc": _mean(aucs)}

    def predictions(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        probs = self.transform(outputs)
        return [
            {
                "label": self.class_names[int(p.argmax())],
                "probabilities": {c: float(v) for c, v in zip(self.class_names, p, strict=False)},
            }
            for p in probs
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "class_names": self.class_names}


class MultilabelHead(Head):
    """Independent binary labels: sigmoid + BCE, NaN targets masked."""

    name = "multilabel"
    primary_metric = "roc_auc"
    metric_modes: ClassVar[dict[str, MetricMode]] = {"loss": "min", "accuracy": "max", "roc_auc": "max"}

    def __init__(self, label_names: list[str]) -> None:
        if not label_names:
            raise ValueError("multilabel needs at least one label")
        self.label_names = [str(c) for c in label_names]

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    @property
    def output_names(self) -> list[str]:
        return [f"p_{c}" for c in self.label_names]

    def encode_targets(self, y: np.ndarray) -> torch.Tensor:
        y = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
        if y.shape[1] != self.num_outputs:
            raise ValueError(f"expected {self.num_outputs} label columns, got {y.shape[1]}")
        return torch.from_numpy(y)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = ~torch.isnan(targets)
        losses = F.binary_cross_entropy_with_logits(outputs.float(), torch.nan_to_num(targets), reduction="none")
        return (losses * mask).sum() / mask.sum().clamp(min=1)

    def transform(self, outputs: np.ndarray) -> np.ndarray:
        return torch.sigmoid(torch.as_tensor(outputs, dtype=torch.float32)).numpy()

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        probs, y = self.transform(outputs), np.asarray(targets)
        mask = ~np.isnan(y)
        aucs = [_auc(y[mask[:, k], k], probs[mask[:, k], k]) for k in range(self.num_outputs)]
        correct = (probs >= 0.5) == (y >= 0.5)
        return {"accuracy": float(correct[mask].mean()) if mask.any() else None, "roc_auc": _mean(aucs)}

    def predictions(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        probs = self.transform(outputs)
        return [
            {
                "labels": [c for c, v in zip(self.label_names, p, strict=False) if v >= 0.5],
                "probabilities": {c: float(v) for c, v in zip(self.label_names, p, strict=False)},
            }
            for p in probs
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "label_names": self.label_names}


class RegressionHead(Head):
    """Real-valued targets, standardised with the training mean/std; MSE loss.

    Metrics and predictions are de-standardised back into the original units.
    """

    name = "regression"
    primary_metric = "rmse"
    metric_modes: ClassVar[dict[str, MetricMode]] = {"loss": "min", "rmse": "min", "mae": "min", "r2": "max"}

    def __init__(
        self,
        target_names: list[str],
        mean: npt.ArrayLike | None = None,
        std: npt.ArrayLike | None = None,
    ) -> None:
        if not target_names:
            raise ValueError("regression needs at least one target")
        self.target_names = [str(c) for c in target_names]
        k = len(self.target_names)
        self.mean = np.zeros(k) if mean is None else np.asarray(mean, dtype=np.float64).reshape(k)
        self.std = np.ones(k) if std is None else np.asarray(std, dtype=np.float64).reshape(k)

    @property
    def num_outputs(self) -> int:
        return len(self.target_names)

    @property
    def output_names(self) -> list[str]:
        return list(self.target_names)

    def fit(self, y_train: np.ndarray) -> RegressionHead:
        """Record the training targets' mean and std (NaN ignored; std 0 -> 1)."""
        y = np.asarray(y_train, dtype=np.float64).reshape(len(y_train), -1)
        with np.errstate(all="ignore"):
            mean, std = np.nanmean(y, axis=0), np.nanstd(y, axis=0)
        self.mean = np.nan_to_num(mean)
        self.std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        return self

    def encode_targets(self, y: np.ndarray) -> torch.Tensor:
        y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        if y.shape[1] != self.num_outputs:
            raise ValueError(f"expected {self.num_outputs} target columns, got {y.shape[1]}")
        return torch.from_numpy(((y - self.mean) / self.std).astype(np.float32))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = ~torch.isnan(targets)
        sq = (outputs.float() - torch.nan_to_num(targets)) ** 2
        return (sq * mask).sum() / mask.sum().clamp(min=1)

    def transform(self, outputs: np.ndarray) -> np.ndarray:
        return (np.asarray(outputs, dtype=np.float64) * self.std + self.mean).astype(np.float32)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        pred = self.transform(outputs).astype(np.float64)
        y = np.asarray(targets, dtype=np.float64) * self.std + self.mean
        rmse: list[float] = []
        mae: list[float] = []
        r2: list[float | None] = []
        for k in range(self.num_outputs):
            m = ~np.isnan(y[:, k])
            if not m.any():
                continue
            err = pred[m, k] - y[m, k]
            rmse.append(math.sqrt(float(np.mean(err**2))))
            mae.append(float(np.mean(np.abs(err))))
            ss_tot = float(np.sum((y[m, k] - y[m, k].mean()) ** 2))
            r2.append(1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else None)
        return {"rmse": _mean(rmse), "mae": _mean(mae), "r2": _mean(r2)}

    def predictions(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        values = self.transform(outputs)
        out = []
        for v in values:
            d: dict[str, Any] = {"values": {c: float(x) for c, x in zip(self.target_names, v, strict=False)}}
            if self.num_outputs == 1:
                d["value"] = float(v[0])
            out.append(d)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "target_names": self.target_names,
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
        }


HEADS = {"classification": ClassificationHead, "multilabel": MultilabelHead, "regression": RegressionHead}
