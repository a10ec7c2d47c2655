"""The model and data of tests/unit/test_ddp_training.py, built the same way by the test and by
each rank process (workers/ml/distributed.py: RankInputs("tests.unit.ddp_inputs:build"))."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from workers.ml.data import PreparedData, load_sequence_frame
from workers.ml.models import build_model
from workers.ml.training import seed_everything


def make_data(rows: int = 200) -> PreparedData:
    rng = np.random.default_rng(0)
    smiles, y = [], []
    for _ in range(rows):  # 200 rows: 160 training rows, 10 global batches of 16, 8 per rank
        atoms = rng.choice(["C", "N", "O"], size=rng.integers(2, 12), p=[0.6, 0.2, 0.2])
        smiles.append("".join(atoms))
        y.append((atoms == "C").sum() - 0.5 * (atoms == "O").sum() + rng.normal(0, 0.1))
    return load_sequence_frame(pd.DataFrame({"smiles": smiles, "y": y}), target_columns="y", task="regression")


def make_model(data: PreparedData, hidden_size: int = 16) -> torch.nn.Module:
    seed_everything(0)
    assert data.tokenizer is not None
    return build_model(
        "rnn",
        {
            "vocab_size": data.tokenizer.vocab_size,
            "num_outputs": 1,
            "embedding_dim": 8,
            "hidden_size": hidden_size,
            "dropout": 0.0,
        },
    )


def build(rows: int = 200, hidden_size: int = 16) -> tuple[torch.nn.Module, PreparedData]:
    data = make_data(rows)
    return make_model(data, hidden_size), data
