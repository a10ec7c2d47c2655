"""Random-SMILES augmentation: the same molecule written from other starting atoms and
traversal orders (Bjerrum 2017; Arús-Pous et al. 2019).

RDKit writes them (`MolToSmiles(doRandom=True)`; `MolToRandomSmilesVect` is the same writer
with its own seeded generator), so a given seed always gives the same strings: a training run,
and a run resumed after a crash, see exactly the same augmented epochs.

Training (`AugmentedSequences`): each epoch, every training molecule appears once canonical
plus `n` random SMILES drawn for (seed, epoch, row), so epochs differ and ensemble members
(seed + i) get their own streams. Validation and test stay canonical. The vocabulary is fitted
on the canonical training strings plus `n` random SMILES of each (a stream of its own), so the
ring-closure digits and branch orders random SMILES use are in it and do not fall to <unk>.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from rdkit import Chem

from .data import Batch, BatchDataset
from .tokenizers import Tokenizer

MAX_VARIANTS = 20  # the train spec's augment.random_smiles bound (app/kinds/train.py)
_SEED_RANGE = 2**31 - 1
VOCAB_STREAM = 1_000_003  # the epoch number the vocabulary's random SMILES are drawn for


def _mol(smiles: str) -> Chem.Mol | None:
    return Chem.MolFromSmiles(smiles) if smiles else None


def _variants_of(mol: Chem.Mol | None, smiles: str, n: int, seed: int) -> list[str]:
    if n <= 0:
        return []
    if mol is None or mol.GetNumAtoms() == 0:  # nothing to reorder: the input itself
        return [smiles] * n
    return list(Chem.MolToRandomSmilesVect(mol, n, randomSeed=int(seed) % _SEED_RANGE))


def random_smiles(smiles: str, rng: random.Random) -> str:
    """One random SMILES of `smiles`, drawn with `rng` (the input itself if RDKit cannot parse it)."""
    return _variants_of(_mol(smiles), smiles, 1, rng.randrange(_SEED_RANGE))[0]


def variants(smiles: str, n: int, seed: int) -> list[str]:
    """`n` random SMILES of `smiles`, the same ones for the same seed (duplicates possible for
    small molecules, which have few distinct writings)."""
    return _variants_of(_mol(smiles), smiles, n, seed)


def row_seeds(seed: int, epoch: int, rows: int) -> np.ndarray:
    """One generator seed per training row for (seed, epoch)."""
    return np.random.default_rng([seed % _SEED_RANGE, epoch]).integers(0, _SEED_RANGE, size=rows)


def vocabulary_texts(smiles: Sequence[str], n: int, seed: int) -> list[str]:
    """What the vocabulary is fitted on: the canonical strings and `n` random SMILES of each."""
    out = list(smiles)
    for s, row_seed in zip(smiles, row_seeds(seed, VOCAB_STREAM, len(smiles)), strict=True):
        out.extend(variants(s, n, int(row_seed)))
    return out


class AugmentedSequences(BatchDataset):
    """Training rows for one epoch: row r < N is molecule r canonical, row N*(k+1) + r its k-th
    random SMILES. `set_epoch(e)` (called by training.fit) draws epoch e's strings; the length
    stays N * (1 + n), so the batch sampler built once serves every epoch."""

    def __init__(self, smiles: Sequence[str], targets: torch.Tensor, tokenizer: Tokenizer, n: int, seed: int) -> None:
        if not 1 <= n <= MAX_VARIANTS:
            raise ValueError(f"random_smiles must be between 1 and {MAX_VARIANTS}, got {n}")
        self.smiles, self.targets_1x, self.tokenizer, self.n, self.seed = list(smiles), targets, tokenizer, n, seed
        self.mols = [_mol(s) for s in self.smiles]  # parsed once, written n times an epoch
        self.targets = targets.repeat((1 + n,) + (1,) * (targets.dim() - 1))
        self.epoch = -1
        self.set_epoch(0)

    def texts_for(self, epoch: int) -> list[str]:
        drawn = [
            _variants_of(mol, s, self.n, int(row_seed))
            for mol, s, row_seed in zip(
                self.mols, self.smiles, row_seeds(self.seed, epoch, len(self.smiles)), strict=True
            )
        ]
        return self.smiles + [d[k] for k in range(self.n) for d in drawn]

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        ids, lengths = self.tokenizer.encode_batch(self.texts_for(epoch))
        self.ids, self.lengths, self.epoch = torch.from_numpy(ids), torch.from_numpy(lengths), epoch

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        lengths = self.lengths[idx]
        width = max(1, int(lengths.max())) if len(idx) else 1
        return (self.ids[idx, :width], lengths), self.targets[idx]
