"""Inference from a saved bundle: online predictions and high-throughput scoring."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.chem import canonical_smiles as canonicalize

from .bundle import load_bundle
from .data import length_buckets, to_unit_range
from .heads import Head
from .tokenizers import Tokenizer
from .training import _autocast, autocast_dtype_for, resolve_device

# ITU-R BT.601 luma weights, as PIL uses for RGB -> L.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def preprocess_image(image: np.ndarray, channels: int, size: Sequence[int]) -> torch.Tensor:
    """One image (H,W), (H,W,C) or (C,H,W) of any dtype -> float [channels, H, W] in [0, 1].

    Alpha is dropped, grayscale <-> RGB converted, and the image resized (bilinear,
    antialiased) to the model's size.
    """
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


class Predictor:
    """A loaded bundle plus the input pipeline it was trained with."""

    def __init__(self, model: nn.Module, config: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.config = config
        self.head = Head.from_dict(config["task"])
        self.input = config["input"]
        self.tokenizer = Tokenizer.from_dict(config["tokenizer"]) if config.get("tokenizer") else None
        self.amp = autocast_dtype_for(self.device)
        norm = config.get("normalization")
        if self.input["kind"] == "image":
            c = self.input["channels"]
            self.mean = torch.tensor(norm["mean"] if norm else [0.0] * c).view(-1, 1, 1)
            self.std = torch.tensor(norm["std"] if norm else [1.0] * c).view(-1, 1, 1)

    @classmethod
    def from_bundle(cls, directory: str | os.PathLike[str], device: str | torch.device = "auto") -> Predictor:
        device = resolve_device(device) if isinstance(device, str) else device
        model, config = load_bundle(directory, device)
        return cls(model, config, device)

    @property
    def output_names(self) -> list[str]:
        return self.head.output_names

    @torch.inference_mode()
    def _forward(self, *inputs: torch.Tensor) -> np.ndarray:
        keep_cpu = getattr(self.model, "cpu_inputs", ())
        inputs = tuple(x if i in keep_cpu else x.to(self.device, non_blocking=True) for i, x in enumerate(inputs))
        with _autocast(self.device, self.amp):
            out = self.model(*inputs)
        return out.float().cpu().numpy()

    # ----------------------------------------------------------------- sequences

    def predict_ids(
        self, ids: np.ndarray, lengths: np.ndarray, *, batch_size: int = 4096, raw: bool = False
    ) -> np.ndarray:
        """Score pre-encoded sequences: float32 [N, len(output_names)] (raw outputs if raw=True).

        Rows are grouped into batches of similar length, so each batch pads only to its
        own longest sequence; results come back in input order.
        """
        if self.tokenizer is None:
            raise ValueError("this model does not take token sequences")
        ids, lengths = np.asarray(ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
        out = np.empty((len(ids), self.head.num_outputs), dtype=np.float32)
        for batch in length_buckets(lengths, batch_size):
            lens = lengths[batch]
            width = max(1, int(lens.max()))
            res = self._forward(torch.from_numpy(ids[batch, :width]), torch.from_numpy(lens))
            out[batch] = res if raw else self.head.transform(res)
        return out

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model does not take token sequences")
        return self.tokenizer

    def _predict_texts(self, texts: list[str], batch_size: int) -> list[dict[str, Any]]:
        if not texts:
            return []
        ids, lengths = self._tokenizer().encode_batch(texts, self.input.get("max_len"))
        raw = self.predict_ids(ids, lengths, batch_size=batch_size, raw=True)
        return self.head.predictions(raw)

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
        self, texts: Sequence[str], *, batch_size: int = 1024, label: str | None = None
    ) -> list[dict[str, Any]]:
        """Whitespace token sequences (e.g. clinical codes) -> one prediction dict each; an
        input longer than max_len tokens gets an error (label names the model in it)."""
        self._require("tokens")
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
        for i, pred in zip(valid, self._predict_texts([texts[i] for i in valid], batch_size), strict=False):
            results[i].update(pred)
        return results

    def predict_smiles(
        self, smiles: Sequence[str], *, batch_size: int = 1024, label: str | None = None
    ) -> list[dict[str, Any]]:
        """SMILES -> {"input", "smiles" (canonical), **prediction} or {"input", "error"} each.
        A SMILES whose canonical form is longer than max_len tokens gets an error (label names
        the model in it), not a prediction from a truncated molecule."""
        self._require("smiles")
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
        for i, pred in zip(valid, self._predict_texts(canon, batch_size), strict=False):
            results[i].update(pred)
        return results

    def score_smiles(
        self, smiles: Sequence[str], *, batch_size: int = 4096, canonical: bool = False
    ) -> tuple[np.ndarray, list[str | None]]:
        """Batch scoring: (scores [N, len(output_names)] with NaN rows for invalid input, errors).

        canonical=True skips RDKit when the caller has already canonicalised the SMILES.
        """
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
        scores = np.full((len(smiles), self.head.num_outputs), np.nan, dtype=np.float32)
        if texts:
            ids, lengths = self._tokenizer().encode_batch(texts, self.input.get("max_len"))
            scores[valid] = self.predict_ids(ids, lengths, batch_size=batch_size)
        return scores, errors

    # ----------------------------------------------------------------- images

    def predict_images(self, images: Sequence[np.ndarray], *, batch_size: int = 256) -> list[dict[str, Any]]:
        """Arrays of any size/channel count -> one prediction dict (or {"error"}) each."""
        self._require("image")
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
            raw = self._forward(torch.stack(tensors[start : start + batch_size]))
            for i, pred in zip(valid[start : start + batch_size], self.head.predictions(raw), strict=False):
                results[i] = pred
        return results

    def predict(self, inputs: Sequence[Any], label: str | None = None) -> list[dict[str, Any]]:
        """Dispatch on the bundle's input kind (for the online predict endpoint); label (e.g.
        `sol v3`) names the model in per-item errors."""
        kind = self.input["kind"]
        if kind == "smiles":
            return self.predict_smiles(inputs, label=label)
        if kind == "tokens":
            return self.predict_tokens(inputs, label=label)
        return self.predict_images([np.asarray(x) for x in inputs])

    def _require(self, kind: str) -> None:
        if self.input["kind"] != kind:
            raise ValueError(f"this model takes {self.input['kind']} input, not {kind}")
