"""Deep ensembles and MC-dropout: several forward passes of one input batch.

`Ensemble(members)` runs every member on the same (already tokenised, already on-device)
batch and stacks their raw outputs into [M, B, K]; the input pipeline runs once for all
members, so M members cost about M forward passes. `member_outputs` gives the same
[M, B, K] shape for a plain model (M = 1), so callers treat both alike.

MC-dropout (`mc_dropout`) switches only the `nn.Dropout` modules to train mode; BatchNorm
and the recurrent layers stay in eval mode, so the T stochastic passes differ only by the
dropout masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["Ensemble", "dropout_rate", "mc_dropout", "member_outputs", "members_of", "owner_mean"]


class Ensemble(nn.Module):
    """Members of one architecture trained with different seeds; forward -> [M, B, K]."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        # inputs the members want on CPU (RNN lengths), read by the training/predict loops
        self.cpu_inputs: tuple[int, ...] = tuple(getattr(members[0], "cpu_inputs", ()))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(*inputs) for member in self.members])


def members_of(model: nn.Module) -> list[nn.Module]:
    """The member modules of an Ensemble, or [model] for a plain model."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def member_outputs(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Raw outputs [M, B, K] of an Ensemble, or [1, B, K] of a plain model."""
    out = model(*inputs)
    return out if isinstance(model, Ensemble) else out.unsqueeze(0)


def dropout_rate(model: nn.Module) -> float:
    """The largest dropout probability among the model's dropout modules (0 without any)."""
    return max((float(m.p) for m in model.modules() if isinstance(m, _DropoutNd)), default=0.0)


@contextmanager
def mc_dropout(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Dropout modules in train mode (everything else untouched) with a fixed RNG seed, so
    the same request gives the same samples; restores modes and the global RNG after."""
    dropouts = [m for m in model.modules() if isinstance(m, _DropoutNd)]
    modes = [m.training for m in dropouts]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for m in dropouts:
            m.train()
        try:
            yield
        finally:
            for m, mode in zip(dropouts, modes, strict=True):
                m.train(mode)


def owner_mean(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Average [S, V, K] view values into [S, n, K] per owner (views of one input: TTA)."""
    counts = np.bincount(owner, minlength=n).astype(np.float64)
    out = np.zeros((n, values.shape[0], values.shape[2]), dtype=np.float64)
    np.add.at(out, owner, np.swapaxes(values, 0, 1))
    return np.swapaxes(out, 0, 1) / np.maximum(counts, 1)[None, :, None]
