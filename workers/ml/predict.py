"""Inference from a saved bundle: online predictions and high-throughput scoring.

Every prediction carries how sure the model is and whether the input is like its
training data:
- the prediction itself is deterministic (eval mode): an ensemble's members' mean
  probabilities / values, temperature-calibrated when the bundle holds a calibration;
- `uncertainty`: "ensemble" (the members' std; "auto" when members > 1), "mc_dropout"
  (std over T passes with only the dropout layers active; the prediction stays the
  deterministic one, so it is reproducible) or "tta" (std over the random-SMILES views
  when tta > 0 and no other method applies); classification adds the entropy of the
  mean probabilities;
- `interval` (regression) and `prediction_set` (classification, on request) from the
  bundle's conformal calibration (workers/ml/calibration.py);
- `domain` from the bundle's reference (workers/ml/domain.py).
With tta = n, each SMILES is read as its canonical form plus n random SMILES
(workers/ml/augment.py) and every member's outputs are averaged over those views.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.chem import canonical_smiles as canonicalize

from . import calibration as cal
from .bundle import load_bundle, load_reference
from .data import length_buckets, to_unit_range
from .domain import FingerprintIndex, capture_embeddings, morgan_packed, nearest_distance
from .ensemble import dropout_rate, mc_dropout, member_outputs, members_of, owner_mean
from .heads import ClassificationHead, Head, MultilabelHead
from .onnx_runtime import OnnxModel
from .onnx_runtime import choose as onnx_backend
from .tokenizers import Tokenizer
from .training import _autocast, autocast_dtype_for, resolve_device

# ITU-R BT.601 luma weights, as PIL uses for RGB -> L.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def channels_last(image: np.ndarray) -> np.ndarray:
    """One image (H,W), (H,W,C) or (C,H,W), C <= 4, of a numeric or bool dtype -> [H, W, C]
    in its own dtype (bool as uint8 0/255); ValueError for any other shape or dtype."""
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype.kind not in "uif":
        raise ValueError(f"unsupported image dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4) and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # channels-first input
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4) or min(a.shape[:2]) < 1:
        raise ValueError(f"expected an image of shape (H,W), (H,W,C) or (C,H,W) with C<=4, got {a.shape}")
    return a


def preprocess_image(image: np.ndarray, channels: int, size: Sequence[int]) -> torch.Tensor:
    """One image (H,W), (H,W,C) or (C,H,W) of any dtype -> float [channels, H, W] in [0, 1].

    Alpha is dropped, grayscale <-> RGB converted, and the image resized (bilinear,
    antialiased) to the model's size.
    """
    a = channels_last(image)
    x = to_unit_range(torch.from_numpy(np.ascontiguousarray(a))).permute(2, 0, 1)
    if x.shape[0] in (2, 4):  # gray+alpha, RGBA
        x = x[:-1]
    if channels == 1 and x.shape[0] == 3:
        x = (x * _LUMA).sum(0, keepdim=True)
    elif channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] != channels:
        raise ValueError(f"cannot convert a {x.shape[0]}-channel image to {channels} channels")
    if tuple(x.shape[1:]) != tuple(size):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp(0.0, 1.0)


UNCERTAINTY_METHODS = ("auto", "mc_dropout", "none")
MAX_MC_SAMPLES = 256
MAX_TTA = 64


@dataclass(frozen=True)
class Options:
    """Per-request choices; see the module docstring."""

    coverage: float = 0.9
    uncertainty: str = "auto"
    mc_samples: int = 20
    tta: int = 0
    prediction_sets: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.coverage < 1.0:
            raise ValueError(f"coverage must be between 0 and 1, got {self.coverage}")
        if self.uncertainty not in UNCERTAINTY_METHODS:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY_METHODS}, got {self.uncertainty!r}")
        if not 2 <= self.mc_samples <= MAX_MC_SAMPLES:
            raise ValueError(f"mc_samples must be between 2 and {MAX_MC_SAMPLES}, got {self.mc_samples}")
        if not 0 <= self.tta <= MAX_TTA:
            raise ValueError(f"tta must be between 0 and {MAX_TTA}, got {self.tta}")


@dataclass
class Combined:
    """Outputs for N inputs: user-facing values [N, K] and what their uncertainty is."""

    values: np.ndarray  # calibrated probabilities / values, float32
    member_std: np.ndarray | None  # the members' std [N, K] (ensembles)
    method: str | None  # the uncertainty method used
    spread: np.ndarray | None  # that method's std [N, K]
    samples: int  # samples behind `spread` (1 without a method)


class Predictor:
    """A loaded bundle plus the input pipeline it was trained with."""

    # ONNX Runtime in place of the module's deterministic forward (workers/ml/onnx_runtime.py)
    onnx: OnnxModel | None = None

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        reference: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.config = config
        self.head = Head.from_dict(config["task"])
        self.input = config["input"]
        self.tokenizer = Tokenizer.from_dict(config["tokenizer"]) if config.get("tokenizer") else None
        self.amp = autocast_dtype_for(self.device)
        self.members = len(members_of(model))
        self.calibration: dict[str, Any] | None = config.get("calibration") or None
        norm = config.get("normalization")
        if self.input["kind"] == "image":
            c = self.input["channels"]
            self.mean = torch.tensor(norm["mean"] if norm else [0.0] * c).view(-1, 1, 1)
            self.std = torch.tensor(norm["std"] if norm else [1.0] * c).view(-1, 1, 1)
        reference = reference or {}
        domain = config.get("domain") or None
        self.domain: dict[str, Any] | None = None
        self._fingerprints: FingerprintIndex | None = None
        self._embeddings: torch.Tensor | None = None
        if domain and self.input["kind"] == "smiles" and "fingerprints" in reference:
            self.domain, self._fingerprints = domain, FingerprintIndex(reference["fingerprints"], self.device)
        elif domain and self.input["kind"] == "image" and "embeddings" in reference:
            self.domain, self._embeddings = domain, reference["embeddings"].to(self.device, torch.float32)

    @classmethod
    def from_bundle(
        cls, directory: str | os.PathLike[str], device: str | torch.device = "auto", backend: str = "auto"
    ) -> Predictor:
        """backend: auto, onnx or torch (workers/ml/onnx_runtime.py says where each runs)."""
        device = resolve_device(device) if isinstance(device, str) else device
        model, config = load_bundle(directory, device)
        predictor = cls(model, config, device, load_reference(directory))
        predictor.onnx = onnx_backend(directory, config, device, backend)
        return predictor

    @property
    def backend(self) -> str:
        """What runs the deterministic forward passes: onnx (ONNX Runtime) or torch."""
        return "torch" if self.onnx is None else "onnx"

    @property
    def output_names(self) -> list[str]:
        return self.head.output_names

    @property
    def supports_mc_dropout(self) -> bool:
        return dropout_rate(self.model) > 0

    def _has_interval(self) -> bool:
        c = self.calibration
        return c is not None and c["type"] == "regression" and (not c.get("normalized") or self.members > 1)

    def score_columns(self, coverage: float = 0.9) -> list[str]:
        """The extra numeric columns of a scoring table, besides output_names (coverage is
        the interval's, for the caller's description; the names do not depend on it)."""
        cols = [f"{n}_std" for n in self.output_names] if self.members > 1 else []
        if self._has_interval():
            cols += [c for n in self.output_names for c in (f"{n}_lo", f"{n}_hi")]
        if self._fingerprints is not None:
            cols += ["nn_similarity", "in_domain"]
        return cols

    # ----------------------------------------------------------------- forward passes

    def _inputs_to_device(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        keep_cpu = getattr(self.model, "cpu_inputs", ())
        return tuple(x if i in keep_cpu else x.to(self.device, non_blocking=True) for i, x in enumerate(inputs))

    @torch.inference_mode()
    def raw_outputs(self, *inputs: torch.Tensor, mc_samples: int = 0) -> np.ndarray:
        """Raw outputs [M, B, K] of every member for one batch of model inputs; with
        mc_samples = T > 0, T MC-dropout passes instead ([T * M, B, K])."""
        if self.onnx is not None and mc_samples <= 0:
            return self.onnx.raw(*inputs)
        inputs = self._inputs_to_device(inputs)
        with _autocast(self.device, self.amp):
            if mc_samples <= 0:
                return member_outputs(self.model, *inputs).float().cpu().numpy()
            with mc_dropout(self.model):
                out = [member_outputs(self.model, *inputs).float() for _ in range(mc_samples)]
        return torch.cat(out).cpu().numpy()

    def _forward(self, *inputs: torch.Tensor) -> np.ndarray:
        """A plain model's raw outputs [B, K]; an ensemble's members' mean raw output."""
        return self.raw_outputs(*inputs).mean(0) if self.members > 1 else self.raw_outputs(*inputs)[0]

    def _ids_outputs(
        self, ids: np.ndarray, lengths: np.ndarray, batch_size: int, mc_samples: int = 0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Members' raw outputs [M, N, K] for pre-encoded sequences (and MC samples [T*M, N, K])."""
        ids, lengths = np.asarray(ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        k = self.head.num_outputs
        det = np.empty((self.members, len(ids), k), dtype=np.float32)
        mc = np.empty((mc_samples * self.members, len(ids), k), dtype=np.float32) if mc_samples else None
        for batch in length_buckets(lengths, batch_size):
            lens = lengths[batch]
            width = max(1, int(lens.max()))
            x = (torch.from_numpy(ids[batch, :width]), torch.from_numpy(lens))
            det[:, batch] = self.raw_outputs(*x)
            if mc is not None:
                mc[:, batch] = self.raw_outputs(*x, mc_samples=mc_samples)
        return det, mc

    # ----------------------------------------------------------------- combining outputs

    def _transform(self, raw: np.ndarray) -> np.ndarray:
        """Raw [S, N, K] -> user-facing [S, N, K] (probabilities / values), per sample."""
        s, n, k = raw.shape
        return self.head.transform(raw.reshape(s * n, k)).reshape(s, n, k)

    def _combine(
        self,
        det: np.ndarray,
        mc: np.ndarray | None,
        opts: Options,
        views: tuple[np.ndarray, int] | None = None,
    ) -> Combined:
        """Members' raw outputs [M, V, K] (MC samples [S, V, K]) -> Combined for N inputs;
        `views` = (owner [V], N) when V rows are TTA views of N inputs."""
        member_vals: np.ndarray = self._transform(det)
        mc_vals = self._transform(mc) if mc is not None else None
        view_std = None
        if views is not None:
            owner, n = views
            per_view = member_vals.mean(0, keepdims=True)
            mean_view = owner_mean(per_view, owner, n)
            view_std = np.sqrt(np.maximum(owner_mean(per_view**2, owner, n) - mean_view**2, 0.0))[0]
            member_vals = owner_mean(member_vals, owner, n)
            mc_vals = owner_mean(mc_vals, owner, n) if mc_vals is not None else None
        values = member_vals[0] if len(member_vals) == 1 else member_vals.mean(0)
        if self.calibration is not None and self.calibration["type"] != "regression":
            values = cal.calibrate_probabilities(self.calibration, values, self._label_names())
        member_std = member_vals.std(0) if len(member_vals) > 1 else None
        out = Combined(np.asarray(values, dtype=np.float32), member_std, None, None, 1)
        if opts.uncertainty == "mc_dropout" and mc_vals is not None:
            out.method, out.spread, out.samples = "mc_dropout", mc_vals.std(0), len(mc_vals)
        elif opts.uncertainty == "auto" and member_std is not None:
            out.method, out.spread, out.samples = "ensemble", member_std, len(member_vals)
        elif opts.uncertainty == "auto" and view_std is not None:
            out.method, out.spread, out.samples = "tta", view_std, opts.tta + 1
        return out

    def _label_names(self) -> list[str]:
        """Class, label or target names (output_names without the p_ of probabilities)."""
        head = self.head
        if isinstance(head, ClassificationHead):
            return head.class_names
        if isinstance(head, MultilabelHead):
            return head.label_names
        return self.output_names

    def _mc_samples(self, opts: Options) -> int:
        if opts.uncertainty != "mc_dropout":
            return 0
        if not self.supports_mc_dropout:
            raise ValueError("this model has no dropout, so mc_dropout cannot estimate its uncertainty")
        return opts.mc_samples

    def _interval(self, c: Combined, coverage: float) -> tuple[np.ndarray, np.ndarray] | None:
        if not self._has_interval() or self.calibration is None:
            return None
        return cal.regression_interval(self.calibration, c.values, self.output_names, coverage, c.member_std)

    # ----------------------------------------------------------------- prediction dicts

    def _base_dicts(self, values: np.ndarray) -> list[dict[str, Any]]:
        """The head's prediction format (label/probabilities, labels, values/value) from
        user-facing values instead of raw outputs."""
        names = self._label_names()
        kind = self.head.name
        out: list[dict[str, Any]] = []
        for v in values:
            d: dict[str, Any]
            if kind == "classification":
                d = {
                    "label": names[int(v.argmax())],
                    "probabilities": {c: float(x) for c, x in zip(names, v, strict=True)},
                }
            elif kind == "multilabel":
                d = {
                    "labels": [c for c, x in zip(names, v, strict=True) if x >= 0.5],
                    "probabilities": {c: float(x) for c, x in zip(names, v, strict=True)},
                }
            else:
                d = {"values": {c: float(x) for c, x in zip(names, v, strict=True)}}
                if len(names) == 1:
                    d["value"] = float(v[0])
            out.append(d)
        return out

    def _dicts(self, c: Combined, opts: Options, domain: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        names = self._label_names()
        out = self._base_dicts(c.values)
        interval = self._interval(c, opts.coverage)
        sets = None
        if opts.prediction_sets and self.calibration is not None and self.calibration["type"] == "classification":
            sets = cal.prediction_sets(self.calibration, c.values, opts.coverage)
        for i, d in enumerate(out):
            u: dict[str, Any] = {"method": c.method, "samples": c.samples}
            if opts.tta:
                u["tta"] = opts.tta
            u["std"] = None if c.spread is None else {n: float(s) for n, s in zip(names, c.spread[i], strict=True)}
            if self.head.name == "classification":
                p = c.values[i].astype(np.float64)
                u["entropy"] = float(-(p * np.log(np.clip(p, 1e-12, 1.0))).sum())
            d["uncertainty"] = u
            if interval is not None:
                lo, hi = interval
                d["interval"] = {
                    "coverage": opts.coverage,
                    "values": {n: [float(lo[i, k]), float(hi[i, k])] for k, n in enumerate(names)},
                }
            if sets is not None:
                d["prediction_set"] = [names[k] for k in sets[i]]
            if domain is not None:
                d["domain"] = domain[i]
        return out

    def _smiles_domain(self, smiles: Sequence[str], fingerprints: np.ndarray | None = None) -> np.ndarray | None:
        """Nearest-neighbour Tanimoto similarity [N] to the training molecules (None without a reference)."""
        if self._fingerprints is None:
            return None
        if fingerprints is None:
            assert self.domain is not None
            fingerprints = morgan_packed(smiles, self.domain.get("radius", 2), self.domain.get("nbits", 2048))
        return self._fingerprints.nearest(fingerprints)

    def _domain_dicts(self, measure: str, values: np.ndarray | None) -> list[dict[str, Any]] | None:
        if values is None or self.domain is None:
            return None
        t = float(self.domain["threshold"])
        inside = values >= t if measure == "nn_similarity" else values <= t
        return [
            {measure: float(v), "in_domain": bool(ok), "threshold": t} for v, ok in zip(values, inside, strict=True)
        ]

    # ----------------------------------------------------------------- sequences

    def predict_ids(
        self, ids: np.ndarray, lengths: np.ndarray, *, batch_size: int = 4096, raw: bool = False
    ) -> np.ndarray:
        """Score pre-encoded sequences: float32 [N, len(output_names)] (raw outputs if raw=True;
        an ensemble's raw output is its members' mean raw output).

        Rows are grouped into batches of similar length, so each batch pads only to its
        own longest sequence; results come back in input order.
        """
        self._tokenizer()
        det, _ = self._ids_outputs(ids, lengths, batch_size)
        if raw:
            return det[0] if self.members == 1 else det.mean(0)
        return self._combine(det, None, Options(uncertainty="none")).values

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model does not take token sequences")
        return self.tokenizer

    def _tta_views(self, texts: list[str], n: int) -> tuple[list[str], np.ndarray]:
        """Each canonical SMILES plus n random SMILES of it (those within max_len tokens)."""
        from .augment import variants

        tok, max_len = self._tokenizer(), self.input.get("max_len")
        views, owner = [], []
        for i, t in enumerate(texts):
            for v in [t, *variants(t, n, 0)]:
                if v is t or not max_len or len(v) <= max_len or len(tok.tokenize(v)) <= max_len:
                    views.append(v)
                    owner.append(i)
        return views, np.asarray(owner, dtype=np.int64)

    def _texts_combined(self, texts: list[str], opts: Options, batch_size: int) -> Combined:
        views: tuple[np.ndarray, int] | None = None
        if opts.tta:
            if self.input["kind"] != "smiles":
                raise ValueError("tta (random SMILES views) applies to SMILES models only")
            texts, owner = self._tta_views(texts, opts.tta)
            views = (owner, int(owner.max()) + 1 if len(owner) else 0)
        ids, lengths = self._tokenizer().encode_batch(texts, self.input.get("max_len"))
        det, mc = self._ids_outputs(ids, lengths, batch_size, self._mc_samples(opts))
        return self._combine(det, mc, opts, views)

    def too_long(self, index: int, text: str, label: str | None = None) -> str | None:
        """The per-item error for a text with more tokens than the model reads (its max_len),
        else None. Online predictions refuse such inputs instead of truncating them."""
        max_len = self.input.get("max_len")
        if not max_len or len(text) <= max_len:  # no text has more tokens than characters
            return None
        n = len(self._tokenizer().tokenize(text))
        if n <= max_len:
            return None
        return f"input {index} has {n} tokens; {f'model {label}' if label else 'the model'} reads at most {max_len}"

    def predict_tokens(
        self, texts: Sequence[str], *, batch_size: int = 1024, label: str | None = None, **options: Any
    ) -> list[dict[str, Any]]:
        """Whitespace token sequences (e.g. clinical codes) -> one prediction dict each; an
        input longer than max_len tokens gets an error (label names the model in it).
        options: Options fields (coverage, uncertainty, mc_samples, prediction_sets)."""
        self._require("tokens")
        opts = Options(**options)
        results: list[dict[str, Any]] = []
        valid = []
        for i, t in enumerate(texts):
            if not (isinstance(t, str) and t.strip()):
                results.append({"input": t, "error": "empty or non-text input"})
            elif (err := self.too_long(i, t, label)) is not None:
                results.append({"input": t, "error": err})
            else:
                valid.append(i)
                results.append({"input": t})
        if valid:
            c = self._texts_combined([texts[i] for i in valid], opts, batch_size)
            for i, pred in zip(valid, self._dicts(c, opts), strict=True):
                results[i].update(pred)
        return results

    def predict_smiles(
        self, smiles: Sequence[str], *, batch_size: int = 1024, label: str | None = None, **options: Any
    ) -> list[dict[str, Any]]:
        """SMILES -> {"input", "smiles" (canonical), **prediction} or {"input", "error"} each.
        A SMILES whose canonical form is longer than max_len tokens gets an error (label names
        the model in it), not a prediction from a truncated molecule.
        options: Options fields (coverage, uncertainty, mc_samples, tta, prediction_sets)."""
        self._require("smiles")
        opts = Options(**options)
        results: list[dict[str, Any]] = []
        valid, canon = [], []
        for i, s in enumerate(smiles):
            c, err = canonicalize(s) if isinstance(s, str) else (None, "input is not a string")
            if c is not None:
                err = self.too_long(i, c, label)
            if c is None or err is not None:
                results.append({"input": s, "error": err})
            else:
                results.append({"input": s, "smiles": c})
                valid.append(i)
                canon.append(c)
        if canon:
            combined = self._texts_combined(canon, opts, batch_size)
            domain = self._domain_dicts("nn_similarity", self._smiles_domain(canon))
            for i, pred in zip(valid, self._dicts(combined, opts, domain), strict=True):
                results[i].update(pred)
        return results

    def score_smiles(
        self, smiles: Sequence[str], *, batch_size: int = 4096, canonical: bool = False
    ) -> tuple[np.ndarray, list[str | None]]:
        """Batch scoring: (scores [N, len(output_names)] with NaN rows for invalid input, errors).

        canonical=True skips RDKit when the caller has already canonicalised the SMILES.
        """
        scores, errors, _ = self._score(smiles, batch_size, canonical, Options(uncertainty="none"), extras=False)
        return scores, errors

    def score_smiles_full(
        self,
        smiles: Sequence[str],
        *,
        canonical: bool = False,
        coverage: float = 0.9,
        fingerprints: np.ndarray | None = None,
        batch_size: int = 4096,
        tta: int = 0,
    ) -> tuple[np.ndarray, list[str | None], dict[str, np.ndarray]]:
        """Batch scoring with the extra columns `score_columns` names: (scores [N, K] float32,
        errors, extras {column: float32 [N]}), NaN rows for invalid inputs (in_domain is 1/0).
        `fingerprints` (packed uint8 [N, nbits/8], aligned with `smiles`) skips computing
        them here."""
        opts = Options(coverage=coverage, uncertainty="none", tta=tta)
        return self._score(smiles, batch_size, canonical, opts, extras=True, fingerprints=fingerprints)

    def _score(
        self,
        smiles: Sequence[str],
        batch_size: int,
        canonical: bool,
        opts: Options,
        *,
        extras: bool,
        fingerprints: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[str | None], dict[str, np.ndarray]]:
        self._require("smiles")
        errors: list[str | None] = [None] * len(smiles)
        texts: list[str] = []
        valid: list[int] = []
        for i, s in enumerate(smiles):
            c, err = (s, None) if canonical else canonicalize(s)
            if c is None:
                errors[i] = err
            else:
                valid.append(i)
                texts.append(c)
        n = len(smiles)
        scores = np.full((n, self.head.num_outputs), np.nan, dtype=np.float32)
        columns = {name: np.full(n, np.nan, dtype=np.float32) for name in self.score_columns()} if extras else {}
        if not texts:
            return scores, errors, columns
        combined = self._texts_combined(texts, opts, batch_size)
        scores[valid] = combined.values
        if not extras:
            return scores, errors, columns
        if combined.member_std is not None:
            for k, name in enumerate(self.output_names):
                columns[f"{name}_std"][valid] = combined.member_std[:, k]
        if (interval := self._interval(combined, opts.coverage)) is not None:
            for k, name in enumerate(self.output_names):
                columns[f"{name}_lo"][valid] = interval[0][:, k]
                columns[f"{name}_hi"][valid] = interval[1][:, k]
        if self._fingerprints is not None and self.domain is not None:
            fps = None if fingerprints is None else np.asarray(fingerprints)[valid]
            sim = self._smiles_domain(texts, fps)
            assert sim is not None
            columns["nn_similarity"][valid] = sim
            columns["in_domain"][valid] = (sim >= float(self.domain["threshold"])).astype(np.float32)
        return scores, errors, columns

    # ----------------------------------------------------------------- images

    def _image_outputs(
        self, batch: torch.Tensor, mc_samples: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Members' raw outputs [M, B, K], MC samples, and nearest reference distances [B]."""
        if self._embeddings is None:
            return self.raw_outputs(batch), self.raw_outputs(batch, mc_samples=mc_samples) if mc_samples else None, None
        with capture_embeddings(self.model) as captured:
            det = self.raw_outputs(batch)
        mc = self.raw_outputs(batch, mc_samples=mc_samples) if mc_samples else None
        return det, mc, nearest_distance(captured[0], self._embeddings)

    def predict_images(
        self, images: Sequence[np.ndarray], *, batch_size: int = 256, **options: Any
    ) -> list[dict[str, Any]]:
        """Arrays of any size/channel count -> one prediction dict (or {"error"}) each.
        options: Options fields (coverage, uncertainty, mc_samples, prediction_sets)."""
        self._require("image")
        opts = Options(**options)
        if opts.tta:
            raise ValueError("tta (random SMILES views) applies to SMILES models only")
        mc_samples = self._mc_samples(opts)
        size, channels = self.input["size"], self.input["channels"]
        results: list[dict[str, Any]] = [{} for _ in images]
        tensors, valid = [], []
        for i, img in enumerate(images):
            try:
                tensors.append((preprocess_image(img, channels, size) - self.mean) / self.std)
                valid.append(i)
            except (ValueError, TypeError) as e:
                results[i] = {"error": str(e)}
        for start in range(0, len(tensors), batch_size):
            det, mc, distance = self._image_outputs(torch.stack(tensors[start : start + batch_size]), mc_samples)
            combined = self._combine(det, mc, opts)
            domain = self._domain_dicts("nn_distance", distance)
            for i, pred in zip(valid[start : start + batch_size], self._dicts(combined, opts, domain), strict=True):
                results[i] = pred
        return results

    def predict(self, inputs: Sequence[Any], label: str | None = None, **options: Any) -> list[dict[str, Any]]:
        """Dispatch on the bundle's input kind (for the online predict endpoint); label (e.g.
        `sol v3`) names the model in per-item errors; options as for Options."""
        kind = self.input["kind"]
        if kind == "smiles":
            return self.predict_smiles(inputs, label=label, **options)
        if kind == "tokens":
            return self.predict_tokens(inputs, label=label, **options)
        return self.predict_images([np.asarray(x) for x in inputs], **options)

    def _require(self, kind: str) -> None:
        if self.input["kind"] != kind:
            raise ValueError(f"this model takes {self.input['kind']} input, not {kind}")
