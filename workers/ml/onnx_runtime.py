"""ONNX Runtime (CPU) behind the Predictor's model call, for sequence models.

A bundle with a checked `model.onnx` (workers/ml/onnx_export.py) can be scored by ONNX
Runtime instead of PyTorch: the Predictor hands its token-id batches to `OnnxModel.raw`,
which returns the members' raw outputs [M, B, K] exactly where the PyTorch module's would
go, so calibration, intervals, the applicability domain and TTA are unchanged; export
checked the two within 1e-4.

Backends (`Predictor.from_bundle(..., backend=...)`):
- "torch": always PyTorch;
- "onnx": ONNX Runtime wherever it applies (a sequence model whose bundle has model.onnx),
  PyTorch elsewhere;
- "auto" (default): ONNX Runtime where bench/onnx_scoring.py measured it faster, i.e. a
  sequence model predicted on the CPU (2026-12-02, one thread each, 20,000 MOSES molecules
  in forward batches of 512: forward passes 1.76x PyTorch's rows/s for one GRU and 1.33x
  for an ensemble of 5, scores within 1.4e-6); PyTorch on a GPU (not measured against it).
MC dropout passes, explanations and image models (their domain reads PyTorch activations)
always run PyTorch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .onnx_export import read_onnx

__all__ = ["BACKENDS", "OnnxModel", "choose"]

BACKENDS = ("auto", "onnx", "torch")
SEQUENCE_INPUTS = ("smiles", "tokens")
CHUNK = 256  # token rows per ONNX Runtime call


class OnnxModel:
    """An ONNX Runtime CPU session over a bundle's model.onnx."""

    def __init__(self, onnx_bytes: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # as many threads as PyTorch uses in this process, so neither backend takes more CPU
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.chunk = CHUNK

    def raw(self, *inputs: torch.Tensor | np.ndarray) -> np.ndarray:
        """The members' raw outputs float32 [M, B, K] for one batch of model inputs.

        Token batches run in slices of CHUNK rows, each trimmed to its own longest row:
        PyTorch packs its sequences and never computes padding, the ONNX graph would compute
        every padded step (the Predictor hands rows sorted by length, so slices pad little)."""
        arrays = [
            np.ascontiguousarray(
                x.numpy(force=True) if isinstance(x, torch.Tensor) else x,
                dtype=np.float32 if name == "images" else np.int64,
            )
            for name, x in zip(self.input_names, inputs, strict=True)
        ]
        if self.input_names != ["ids", "lengths"]:
            return self.session.run(["raw"], dict(zip(self.input_names, arrays, strict=True)))[0]
        ids, lengths = arrays
        out = []
        for start in range(0, max(len(ids), 1), self.chunk):
            lens = lengths[start : start + self.chunk]
            width = max(1, int(lens.max(initial=0)))
            feeds = {"ids": np.ascontiguousarray(ids[start : start + self.chunk, :width]), "lengths": lens}
            out.append(self.session.run(["raw"], feeds)[0])
        return np.concatenate(out, axis=1)


def choose(
    directory: str | os.PathLike[str], config: dict[str, Any], device: torch.device, backend: str = "auto"
) -> OnnxModel | None:
    """The ONNX Runtime model to score `directory`'s bundle with, or None for PyTorch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch" or config["input"]["kind"] not in SEQUENCE_INPUTS:
        return None
    if backend == "auto" and device.type != "cpu":
        return None
    onnx_bytes = read_onnx(directory)
    return None if onnx_bytes is None else OnnxModel(onnx_bytes)
