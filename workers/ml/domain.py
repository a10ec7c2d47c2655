"""Applicability domain: is an input like the molecules (or images) the model learned from?

SMILES models. The bundle stores the Morgan fingerprints (radius 2, 2048 bits, bits packed
with np.packbits) of the training molecules in `reference.safetensors` ("fingerprints"; a
seeded random subset when there are more than MAX_FINGERPRINTS). A query's
`nn_similarity` is its largest Tanimoto similarity to any reference molecule.
Threshold rule: the 5th percentile of the validation molecules' nearest-neighbour
similarity to the training reference; a query is `in_domain` when nn_similarity >=
threshold, so 95% of molecules drawn like the validation set are in domain.

Image models. The reference is the penultimate-layer embeddings (the CNN's hidden layer
after its ReLU; member 0's for an ensemble) of at most MAX_EMBEDDINGS training images (a
seeded random subset), "embeddings" float32 [N, D]. `nn_distance` is the Euclidean distance
to the nearest; threshold = the 95th percentile of the validation images' distances; a
query is in domain when nn_distance <= threshold.

Similarities are computed with batched matrix products on unpacked bits (intersection =
A @ B.T, union = |a| + |b| - intersection), chunked so memory stays bounded for any
number of queries. Torch is imported lazily: the RDKit-only scoring children import
`morgan_packed` without it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

RADIUS, NBITS = 2, 2048
MAX_FINGERPRINTS = 50_000
MAX_EMBEDDINGS = 5_000
SIMILARITY_PERCENTILE = 5.0  # of validation nearest-neighbour similarities
DISTANCE_PERCENTILE = 95.0  # of validation nearest-neighbour distances
# Elements of one [queries, references] block of similarities (64 MiB in float32).
BLOCK_ELEMENTS = 1 << 24
# Unpacked reference bits kept resident up to this many bytes; beyond, unpacked per block.
RESIDENT_BYTES = 256 << 20

SIMILARITY_RULE = (
    "in domain when the nearest-neighbour Tanimoto similarity (Morgan radius 2, 2048 bits) to the "
    "training molecules is at least the 5th percentile of the validation molecules' similarities"
)
DISTANCE_RULE = (
    "in domain when the Euclidean distance of the penultimate-layer embedding to the nearest "
    "training image is at most the 95th percentile of the validation images' distances"
)


# --------------------------------------------------------------------------- fingerprints


@functools.lru_cache(maxsize=4)
def _generator(radius: int, nbits: int) -> Any:
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=nbits)


def morgan_packed(smiles: Sequence[str], radius: int = RADIUS, nbits: int = NBITS) -> np.ndarray:
    """Morgan bit fingerprints, packed: uint8 [N, nbits/8]; a zero row where RDKit fails."""
    from rdkit import Chem

    from app.chem import quiet_rdkit

    if nbits % 8:
        raise ValueError("nbits must be a multiple of 8")
    gen = _generator(radius, nbits)
    out = np.zeros((len(smiles), nbits // 8), dtype=np.uint8)
    with quiet_rdkit():
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s) if isinstance(s, str) and s else None
            if mol is not None:
                out[i] = np.packbits(gen.GetFingerprintAsNumPy(mol).astype(bool))
    return out


def _unpack(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, B] -> {0, 1} [N, 8B] in np.unpackbits order (most significant bit first)."""
    import torch

    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1).to(dtype)


class FingerprintIndex:
    """Packed reference fingerprints on a device, answering nearest-neighbour Tanimoto."""

    def __init__(self, reference: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.packed = torch.as_tensor(np.asarray(reference, dtype=np.uint8)).to(self.device)
        nbits = self.packed.shape[1] * 8
        # Counts and intersections are integers <= nbits: exact in fp16 up to 2048 bits.
        self.dtype = torch.float16 if self.device.type == "cuda" and nbits <= 2048 else torch.float32
        itemsize = 2 if self.dtype == torch.float16 else 4
        self.block_rows = max(1, min(len(self.packed), RESIDENT_BYTES // max(nbits * itemsize, 1)))
        self._blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if len(self.packed) <= self.block_rows:
            self._blocks = list(self._make_blocks())

    def __len__(self) -> int:
        return len(self.packed)

    def _make_blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.packed), self.block_rows):
            bits = _unpack(self.packed[start : start + self.block_rows], self.dtype)
            yield bits, bits.float().sum(1)

    def nearest(self, query: np.ndarray | torch.Tensor) -> np.ndarray:
        """Max Tanimoto similarity of each packed query row to the reference: float32 [N]
        (0 for an all-zero query, e.g. an unparsable SMILES, or an empty reference)."""
        import torch

        q_all = torch.as_tensor(np.asarray(query, dtype=np.uint8))
        best = np.zeros(len(q_all), dtype=np.float32)
        if len(self.packed) == 0 or len(q_all) == 0:
            return best
        q_rows = max(1, BLOCK_ELEMENTS // min(self.block_rows, len(self.packed)))
        for start in range(0, len(q_all), q_rows):
            q = _unpack(q_all[start : start + q_rows].to(self.device), self.dtype)
            q_count = q.float().sum(1, keepdim=True)
            top = torch.zeros(len(q), device=self.device)
            for bits, count in self._blocks if self._blocks is not None else self._make_blocks():
                inter = (q @ bits.T).float()
                union = q_count + count[None, :] - inter
                sim = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
                top = torch.maximum(top, sim.max(1).values)
            best[start : start + len(q)] = top.cpu().numpy()
        return best


def nearest_similarity(
    query_packed: np.ndarray, ref_packed: np.ndarray, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Max Tanimoto similarity of each packed query fingerprint to the packed reference: [N]."""
    return FingerprintIndex(ref_packed, device).nearest(query_packed)


def subsample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Row indices of a reference: all rows up to `limit`, else a seeded random subset (sorted)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# --------------------------------------------------------------------------- image embeddings


def _embedding_layer(model: nn.Module) -> nn.Module:
    from .ensemble import members_of

    member = members_of(model)[0]
    layer = getattr(member, "fc1", None)
    if layer is None:
        raise ValueError(f"{type(member).__name__} has no penultimate layer `fc1` to embed with")
    return layer


@contextmanager
def capture_embeddings(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """During forward passes of `model` (an ImageCNN or an Ensemble of them), collect the
    penultimate-layer embeddings [B, D] (after ReLU, float32) of member 0, one per pass."""
    import torch

    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        captured.append(torch.relu(output).detach().float())

    handle = _embedding_layer(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def image_embeddings(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer embeddings [B, D] of normalised images x [B, C, H, W]."""
    import torch

    with torch.inference_mode(), capture_embeddings(model) as captured:
        model(x)
    return captured[0]


def nearest_distance(query: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Euclidean distance of each query embedding to its nearest reference row: [N]."""
    import torch

    out = np.zeros(len(query), dtype=np.float32)
    if len(reference) == 0 or len(query) == 0:
        return out
    reference = reference.to(query.device, torch.float32)
    rows = max(1, BLOCK_ELEMENTS // len(reference))
    for start in range(0, len(query), rows):
        d = torch.cdist(query[start : start + rows].float(), reference)
        out[start : start + rows] = d.min(1).values.cpu().numpy()
    return out


# --------------------------------------------------------------------------- thresholds


def similarity_threshold(val_similarity: np.ndarray) -> float:
    return float(np.percentile(val_similarity, SIMILARITY_PERCENTILE))


def distance_threshold(val_distance: np.ndarray) -> float:
    return float(np.percentile(val_distance, DISTANCE_PERCENTILE))


def smiles_config(threshold: float, reference_rows: int, training_rows: int) -> dict[str, Any]:
    return {
        "type": "morgan_tanimoto",
        "radius": RADIUS,
        "nbits": NBITS,
        "threshold": threshold,
        "reference_rows": reference_rows,
        "training_rows": training_rows,
        "rule": SIMILARITY_RULE,
    }


def image_config(threshold: float, reference_rows: int, training_rows: int) -> dict[str, Any]:
    return {
        "type": "embedding_distance",
        "layer": "fc1",
        "member": 0,
        "threshold": threshold,
        "reference_rows": reference_rows,
        "training_rows": training_rows,
        "rule": DISTANCE_RULE,
    }
