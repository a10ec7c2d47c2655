"""Random-SMILES augmentation (workers/ml/augment.py): deterministic per seed, different per
epoch and per seed, the same molecule, a vocabulary that knows the random strings' tokens,
and validation/test left canonical."""
from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem

from workers.ml import augment
from workers.ml.data import SequenceDataset, load_sequence_frame
from workers.ml.tokenizers import UNK_ID

# 48 small drug-like molecules (canonical), targets a smooth function of size and polarity.
MOLECULES = [
    "CCO", "CCN", "CCCO", "CC(C)O", "CCOC(C)=O", "CC(=O)O", "CC(=O)N", "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1",
    "Nc1ccccc1", "Clc1ccccc1", "c1ccncc1", "c1ccc2ccccc2c1", "C1CCCCC1", "C1CCNCC1", "C1COCCN1", "OCCO",
    "CC(C)(C)O", "CCCCCC", "CCCCCCCC", "CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "O=C(O)c1ccccc1",
    "CC(N)C(=O)O", "NCC(=O)O", "OC1CCCCC1", "CC1=CC(=O)CCC1", "c1ccc(-c2ccccc2)cc1", "FC(F)(F)c1ccccc1",
    "CS(C)=O", "CC#N", "C=CC=C", "CCBr", "ClCCl", "OC(=O)CCC(=O)O", "CCOCC", "c1ccsc1", "c1ccoc1",
    "c1cc[nH]c1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "CN1C=NC2=C1C(=O)N(C)C(=O)N2C", "O=C1NC(=O)C(=O)N1",
    "CCN(CC)CC", "OCC(O)CO", "C1=CC=CC=C1O", "CC(C)=O", "CCCCO",
]


def frame() -> pd.DataFrame:
    canon = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in MOLECULES]
    y = [0.1 * Chem.MolFromSmiles(s).GetNumAtoms() - 0.3 * s.count("O") for s in canon]
    return pd.DataFrame({"smiles": canon, "y": y})


def same_molecule(a: str, b: str) -> bool:
    return Chem.MolToSmiles(Chem.MolFromSmiles(a)) == Chem.MolToSmiles(Chem.MolFromSmiles(b))


def test_variants_are_the_same_molecule_and_deterministic_per_seed() -> None:
    s = "CC(=O)Oc1ccccc1C(=O)O"
    first, again, other = augment.variants(s, 8, 7), augment.variants(s, 8, 7), augment.variants(s, 8, 8)
    assert first == again and first != other and len(first) == 8
    assert len(set(first)) > 1 and all(same_molecule(v, s) for v in first + other)
    assert augment.random_smiles(s, random.Random(3)) == augment.random_smiles(s, random.Random(3))
    assert same_molecule(augment.random_smiles(s, random.Random(3)), s)
    assert augment.variants("not a smiles", 2, 0) == ["not a smiles"] * 2  # unparsable: left as it is
    assert augment.variants(s, 0, 0) == []


def test_each_epoch_draws_new_strings_and_each_seed_its_own_stream() -> None:
    from workers.ml.tokenizers import SmilesTokenizer

    smiles = MOLECULES[:10]
    tok = SmilesTokenizer().fit(augment.vocabulary_texts(smiles, 2, 0))
    targets = np.arange(10, dtype=np.float32).reshape(-1, 1)
    import torch

    ds = augment.AugmentedSequences(smiles, torch.from_numpy(targets), tok, 2, seed=5)
    assert len(ds) == 30 and ds.targets[:10].equal(ds.targets[10:20])
    epoch1, epoch2 = ds.texts_for(1), ds.texts_for(2)
    assert epoch1[:10] == smiles and epoch1 != epoch2 and epoch1 == ds.texts_for(1)
    assert all(same_molecule(a, smiles[i % 10]) for i, a in enumerate(epoch2))
    other_member = augment.AugmentedSequences(smiles, torch.from_numpy(targets), tok, 2, seed=6)
    assert other_member.texts_for(1) != epoch1
    ds.set_epoch(2)
    (ids, lengths), y = ds.__getitems__([12, 25])
    assert tok.decode(ids[0, : lengths[0]].tolist()) == epoch2[12] and y[1, 0] == 5.0
    with pytest.raises(ValueError, match="random_smiles"):
        augment.AugmentedSequences(smiles, torch.from_numpy(targets), tok, 21, seed=0)


def test_prepared_data_augments_training_only_and_its_vocabulary_knows_random_smiles() -> None:
    common = dict(text_column="smiles", target_columns="y", task="regression", seed=0, max_len=64)
    plain = load_sequence_frame(frame(), **common)
    augmented = load_sequence_frame(frame(), **common, augment=3, augment_seed=11)
    n_train = len(plain.train)
    assert isinstance(augmented.train, augment.AugmentedSequences) and len(augmented.train) == 4 * n_train
    assert augmented.texts["train"] == plain.texts["train"]  # same split; canonical texts kept
    assert isinstance(augmented.val, SequenceDataset) and isinstance(augmented.test, SequenceDataset)
    tok = augmented.tokenizer

    def decoded(data, split: str) -> list[str]:  # noqa: ANN001
        ds = getattr(data, split)
        return [data.tokenizer.decode(ds.ids[i, : ds.lengths[i]].tolist()) for i in range(len(ds))]

    for split in ("val", "test"):  # the same canonical strings (tokens no training molecule has stay <unk>)
        assert decoded(augmented, split) == decoded(plain, split)
    assert augmented.info["augment"] == {"random_smiles": 3}
    assert set(plain.tokenizer.vocab.itos) <= set(tok.vocab.itos)
    # The epochs' random SMILES (not the ones the vocabulary saw) almost never fall to <unk>.
    train = augmented.train
    for epoch in (1, 2):
        train.set_epoch(epoch)
        real = train.ids[train.ids > 0]
        assert (real == UNK_ID).float().mean() < 0.01
    with pytest.raises(ValueError, match="SMILES"):
        load_sequence_frame(frame(), **{**common, "tokenizer": "whitespace"}, augment=1)


def test_fit_draws_a_new_augmentation_every_epoch() -> None:
    from workers.ml.models import build_model
    from workers.ml.training import TrainConfig, fit

    data = load_sequence_frame(frame(), text_column="smiles", target_columns="y", task="regression", seed=0,
                               max_len=64, augment=1, augment_seed=3)
    seen: list[int] = []
    original = data.train.set_epoch

    def spy(epoch: int) -> None:
        seen.append(epoch)
        original(epoch)

    data.train.set_epoch = spy  # type: ignore[method-assign]
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": 8,
                                "embedding_dim": 8})
    out = fit(model, data, TrainConfig(epochs=3, batch_size=16, seed=3, device="cpu"))
    assert seen == [1, 2, 3] and out["epochs_trained"] == 3
