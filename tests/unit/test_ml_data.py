import io

import numpy as np
import pandas as pd
import torch

from app.chem import murcko_scaffold
from workers.ml.data import (
    EpochBatchSampler,
    length_buckets,
    load_image_npz,
    load_sequence_frame,
    make_loader,
    random_split_indices,
    scaffold_split_indices,
)
from workers.ml.heads import ClassificationHead, MultilabelHead, RegressionHead

RINGS = ["c1ccccc1", "c1ccncc1", "C1CCCCC1", "c1ccc2ccccc2c1", "C1CCNCC1", "c1ccsc1", "C1CCOC1", "c1ccoc1",
         "c1cnccn1", "C1CC1", "c1ccc(-c2ccccc2)cc1", "C1CCC(=O)N1"]
SUBS = ["C", "CC", "O", "N", "Cl", "Br", "F", "OC", "C(=O)O", "CN"]


def _library():
    out = []
    for ring in RINGS:
        for sub in SUBS:
            out.append(f"{sub}{ring}")
    out += ["CCO", "CCCC", "CC(=O)O", "CCN"]  # acyclic: scaffold ""
    return out


def test_scaffold_split_keeps_each_scaffold_in_one_split():
    smiles = _library()
    splits = scaffold_split_indices(smiles, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    all_idx = np.concatenate(list(splits.values()))
    assert sorted(all_idx.tolist()) == list(range(len(smiles)))
    assert all(len(v) > 0 for v in splits.values())
    owner = {}
    for name, idx in splits.items():
        for i in idx:
            sc = murcko_scaffold(smiles[i])
            assert owner.setdefault(sc, name) == name, f"scaffold {sc!r} in {owner[sc]} and {name}"
    assert len(splits["train"]) >= len(splits["val"])


def test_random_split_is_seeded_partition():
    a = random_split_indices(101, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=5)
    b = random_split_indices(101, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=5)
    assert all((a[k] == b[k]).all() for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(101))
    assert (len(a["val"]), len(a["test"])) == (10, 10)


def test_sequence_frame_canonicalises_reports_invalid_and_fits_vocab_on_train():
    smiles = _library()
    df = pd.DataFrame({"smiles": smiles + ["C1CC(", "not a smiles", "CCO"],
                       "active": [i % 2 for i in range(len(smiles))] + [1, 0, None]})
    data = load_sequence_frame(df, target_columns="active", task="classification",
                               split={"method": "scaffold", "train": 0.8, "val": 0.1, "test": 0.1})
    assert data.info["invalid_rows"] == 2 and data.info["missing_target_rows"] == 1
    assert "syntax error" in data.info["invalid_examples"][0]["error"]
    assert isinstance(data.head, ClassificationHead) and data.head.class_names == ["0", "1"]
    assert sum(data.info["rows"].values()) == len(smiles)
    (ids, lengths), y = data.train.__getitems__(list(range(len(data.train))))
    assert ids.shape[1] == int(lengths.max()) and y.dtype == torch.int64
    assert data.input == {"kind": "smiles", "max_len": 256}


def test_sequence_frame_regression_and_multilabel():
    df = pd.DataFrame({"codes": ["A B", "B C", "A C D", "D", "A", "B B"] * 5,
                       "y1": np.arange(30.0), "y2": [np.nan, 1.0] * 15})
    reg = load_sequence_frame(df, text_column="codes", target_columns=["y1", "y2"], task="regression",
                              tokenizer="whitespace", seed=1)
    assert isinstance(reg.head, RegressionHead) and reg.input["kind"] == "tokens"
    _, y = reg.train.__getitems__(list(range(len(reg.train))))
    assert abs(float(y[:, 0].mean())) < 1e-5  # standardised on train
    df["l1"] = [0, 1] * 15
    df["l2"] = [1, 1, 0] * 10
    ml = load_sequence_frame(df, text_column="codes", target_columns=["l1", "l2"], tokenizer="whitespace")
    assert isinstance(ml.head, MultilabelHead) and ml.head.label_names == ["l1", "l2"]


def _npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    return buf


def test_image_npz_given_splits_rgb_and_normalisation():
    rng = np.random.default_rng(0)
    src = _npz_bytes(train_images=rng.integers(0, 256, (20, 8, 6, 3), dtype=np.uint8),
                     train_labels=rng.integers(0, 4, (20, 1)),
                     val_images=rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8), val_labels=np.arange(5) % 4,
                     test_images=rng.integers(0, 256, (6, 8, 6, 3), dtype=np.uint8), test_labels=np.arange(6) % 4)
    data = load_image_npz(src)
    assert data.info["split"] == "given" and data.info["rows"] == {"train": 20, "val": 5, "test": 6}
    assert data.input == {"kind": "image", "channels": 3, "size": [8, 6]}
    (x,), y = data.train.__getitems__(list(range(20)))
    assert x.dtype == torch.float32 and x.shape == (20, 3, 8, 6)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert data.head.class_names == ["0", "1", "2", "3"] and y.dtype == torch.int64


def test_image_npz_random_split_and_multilabel():
    rng = np.random.default_rng(0)
    data = load_image_npz({"train_images": rng.integers(0, 256, (50, 5, 5), dtype=np.uint8),
                           "train_labels": rng.integers(0, 2, (50, 3))}, split={"train": 0.6, "val": 0.2, "test": 0.2})
    assert isinstance(data.head, MultilabelHead) and data.info["rows"] == {"train": 30, "val": 10, "test": 10}
    assert data.input["channels"] == 1


def test_length_buckets_and_epoch_sampler():
    lengths = np.array([5, 1, 9, 3, 3, 7, 2])
    batches = length_buckets(lengths, 3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    assert [lengths[b].tolist() for b in batches] == [[1, 2, 3], [3, 5, 7], [9]]
    s = EpochBatchSampler(100, 8, shuffle=True, seed=1, lengths=np.arange(100) % 13)
    s.set_epoch(3)
    first = list(s)
    s.set_epoch(4)
    assert list(s) != first
    s.set_epoch(3)
    assert list(s) == first
    assert sorted(i for b in first for i in b) == list(range(100))


def test_loader_yields_ready_batches():
    data = load_sequence_frame(pd.DataFrame({"smiles": ["CCO", "c1ccccc1", "CCN", "CC"] * 5, "y": [0, 1] * 10}),
                               target_columns="y", split={"train": 1.0})
    assert data.val is None and data.test is None
    loader = make_loader(data.train, 6, shuffle=True)
    n = 0
    for (ids, lengths), y in loader:
        assert ids.shape[0] == lengths.shape[0] == y.shape[0] <= 6
        n += len(y)
    assert n == 20
