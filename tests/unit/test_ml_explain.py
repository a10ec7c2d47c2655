"""Attributions (workers/ml/explain.py): IG completeness, the token -> atom rule, Grad-CAM and
IG heat maps, and the faithfulness check on a task whose answer is one atom type."""

import random
import time

import numpy as np
import pandas as pd
import pytest
import torch
from rdkit import Chem

from app.modelconfig import CNNConfig, RNNConfig
from workers.ml.cnn import ImageCNN
from workers.ml.data import PreparedData, SequenceDataset, load_image_npz, load_sequence_frame
from workers.ml.draw import mol_from_smiles
from workers.ml.ensemble import Ensemble
from workers.ml.explain import (
    EXPLAINABLE_INPUTS,
    explain_images,
    explain_smiles,
    faithfulness,
    faithfulness_images,
    is_atom_token,
    token_atoms,
)
from workers.ml.heads import ClassificationHead, MultilabelHead, RegressionHead
from workers.ml.predict import Predictor
from workers.ml.rnn import SequenceRNN
from workers.ml.tokenizers import SmilesTokenizer

torch.set_num_threads(1)

# canonical SMILES (explain_smiles takes canonical input, as predict_smiles makes it)
SMILES = ["CC(=O)Oc1ccccc1C(=O)O", "c1ccc2[nH]ccc2c1", "[NH3+]CC(Br)CCl", "C1=CCCCC1", "N[C@@H](CO)C(=O)[O-]"]


def _tokenizer(texts):
    return SmilesTokenizer(max_len=128).fit(texts)


def _rnn(vocab_size, num_outputs=1, seed=0, **kw):
    torch.manual_seed(seed)
    params = {"embedding_dim": 16, "hidden_size": 24, "cell": "gru", "dropout": 0.3, **kw}
    return SequenceRNN(RNNConfig(vocab_size=vocab_size, num_outputs=num_outputs, **params)).eval()


def _predictor(model, head, tokenizer, calibration=None):
    config = {
        "task": head.to_dict(),
        "output_names": head.output_names,
        "input": {"kind": "smiles", "max_len": tokenizer.max_len},
        "tokenizer": tokenizer.to_dict(),
        "normalization": None,
    }
    if calibration is not None:
        config["calibration"] = calibration
    return Predictor(model, config, "cpu")


def _assert_complete(result):
    for out in result["outputs"].values():
        change = out["prediction"] - out["baseline"]
        assert abs(out["delta"]) <= 0.05 * abs(change) + 1e-6, out


# --------------------------------------------------------------------------- completeness


def test_integrated_gradients_complete_on_gru_regression():
    tok = _tokenizer(SMILES)
    head = RegressionHead(["logS", "logP"], mean=[-2.0, 1.0], std=[3.0, 0.5])
    p = _predictor(_rnn(tok.vocab_size, 2), head, tok)
    results = explain_smiles(p, SMILES, steps=32)
    plain = p.predict_smiles(SMILES)
    for s, res, pred in zip(SMILES, results, plain, strict=True):
        assert set(res["outputs"]) == {"logS", "logP"}
        assert res["tokens"] == tok.tokenize(s)
        _assert_complete(res)
        for name, out in res["outputs"].items():
            assert out["prediction"] == pytest.approx(pred["values"][name], abs=1e-4)  # user units
            weights = np.array(list(out["atom_weights"].values()))
            assert len(weights) == Chem.MolFromSmiles(s).GetNumAtoms()
            assert np.abs(weights).max() == pytest.approx(1.0)
            assert np.abs(out["token_weights"]).max() == pytest.approx(1.0)
            # weight * scale is the contribution in output units
            assert out["scale"] > 0


def test_integrated_gradients_complete_on_ensemble_classification():
    texts = SMILES[:3]
    tok = _tokenizer(texts)
    head = ClassificationHead(["inactive", "active", "toxic"])
    model = Ensemble([_rnn(tok.vocab_size, 3, seed=1), _rnn(tok.vocab_size, 3, seed=2, cell="lstm")]).eval()
    p = _predictor(model, head, tok)
    [one] = explain_smiles(p, texts[:1], target=1)
    assert set(one["outputs"]) == {"p_active"}
    results = explain_smiles(p, texts, steps=32)
    with torch.no_grad():
        probs = torch.softmax(model(*[torch.from_numpy(a) for a in tok.encode_batch(texts)]), -1).mean(0)
    for i, res in enumerate(results):
        _assert_complete(res)
        for k, name in enumerate(head.output_names):
            assert res["outputs"][name]["prediction"] == pytest.approx(float(probs[i, k]), abs=1e-5)
    # probabilities: attributions of all classes cancel (sum of changes is 0)
    total = sum(o["prediction"] - o["baseline"] for o in results[0]["outputs"].values())
    assert total == pytest.approx(0.0, abs=1e-5)
    assert one["outputs"]["p_active"]["token_weights"] == pytest.approx(
        results[0]["outputs"]["p_active"]["token_weights"], abs=1e-4
    )


def test_explained_prediction_follows_temperature_calibration():
    tok = _tokenizer(SMILES)
    head = ClassificationHead(["0", "1"])
    model = _rnn(tok.vocab_size, 2)
    calibrated = explain_smiles(_predictor(model, head, tok, {"type": "classification", "temperature": 3.0}), SMILES)
    plain = explain_smiles(_predictor(model, head, tok), SMILES)
    for c, u in zip(calibrated, plain, strict=True):
        _assert_complete(c)
        pc, pu = c["outputs"]["p_1"]["prediction"], u["outputs"]["p_1"]["prediction"]
        assert abs(pc - 0.5) <= abs(pu - 0.5) + 1e-7  # T > 1 pulls probabilities towards 1/2


def test_multilabel_bidirectional_lstm_with_calibration():
    tok = _tokenizer(SMILES)
    head = MultilabelHead(["tox", "herg"])
    model = _rnn(tok.vocab_size, 2, cell="lstm", bidirectional=True, num_layers=2)
    calibration = {"type": "multilabel", "method": "temperature", "temperature": {"tox": 2.0, "herg": 0.5}}
    p = _predictor(model, head, tok, calibration)
    for res in explain_smiles(p, SMILES, steps=32):
        _assert_complete(res)
        assert set(res["outputs"]) == {"p_tox", "p_herg"}


def test_bad_inputs_get_errors_and_the_rest_is_explained():
    tok = _tokenizer(SMILES)
    p = _predictor(_rnn(tok.vocab_size), RegressionHead(["y"]), tok)
    long_smiles = "C" * 200
    results = explain_smiles(p, ["CCO", "C1CC(", "", long_smiles, 5, "c1ccccc1"])  # type: ignore[list-item]
    assert "outputs" in results[0]
    assert "outputs" in results[5]
    assert all("error" in r for r in results[1:5])
    assert "128" in results[3]["error"]
    with pytest.raises(ValueError, match="target"):
        explain_smiles(p, ["CCO"], target=3)


def test_explained_predict_overhead_is_bounded():
    """One molecule, 32 steps: a few times a plain prediction (the bench measures the ratio)."""
    tok = _tokenizer(SMILES)
    p = _predictor(_rnn(tok.vocab_size, embedding_dim=64, hidden_size=128), RegressionHead(["y"]), tok)
    smiles = [SMILES[0]]

    def best(fn, n=5):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    plain = best(lambda: p.predict_smiles(smiles))
    explained = best(lambda: explain_smiles(p, smiles, steps=32))
    assert explained < 100 * plain  # loose on a shared box; the benchmark holds the real ratio


# --------------------------------------------------------------------------- token -> atom rule


@pytest.mark.parametrize(
    "smiles",
    [
        "CC(=O)Oc1ccccc1C(=O)O",
        "c1ccc2[nH]ccc2c1",
        "ClCC(Br)C[NH3+]",
        "[O-][N+](=O)c1ccccc1",
        "C%10CCCCC%10",
        "C[C@@H](N)C(=O)O",
        "[Na+].[Cl-]",
        "F/C=C/F",
        "[2H]C([2H])([2H])Cl",
        "[H][H]",
    ],
)
def test_atom_tokens_match_rdkit_atoms(smiles):
    tokens = SmilesTokenizer().tokenize(smiles)
    shares, n_atoms = token_atoms(tokens)
    mol = mol_from_smiles(smiles)  # keeps [H] atoms, as explain_smiles and the drawings do
    assert mol is not None
    assert n_atoms == mol.GetNumAtoms()
    atom_tokens = [t for t in tokens if is_atom_token(t)]
    for idx, tok in enumerate(atom_tokens):
        symbol = mol.GetAtomWithIdx(idx).GetSymbol()
        assert tok.strip("[]").lstrip("0123456789").lower().startswith(symbol.lower())
    for s in shares:  # every token's weight is kept whole or dropped
        assert sum(w for _, w in s) == pytest.approx(1.0 if s else 0.0)


def test_bond_ring_and_branch_tokens_follow_the_rule():
    tokens = SmilesTokenizer().tokenize("CC(C)=O")  # C C ( C ) = O
    shares, _ = token_atoms(tokens)
    assert shares[2] == []
    assert shares[4] == []
    assert sorted(shares[5]) == [(1, 0.5), (3, 0.5)]  # "=" binds the branch root C1 and O3
    tokens = SmilesTokenizer().tokenize("C=1CCCCC1")  # ring bond written before the digit
    shares, _ = token_atoms(tokens)
    assert tokens[1] == "="
    assert sorted(shares[1]) == [(0, 0.5), (5, 0.5)]
    assert shares[2] == [(0, 1.0)]
    assert shares[-1] == [(5, 1.0)]
    tokens = SmilesTokenizer().tokenize("CC.O")
    shares, n = token_atoms(tokens)
    assert shares[2] == []
    assert n == 3
    assert [is_atom_token(t) for t in ["Cl", "Br", "c", "[nH]", "[Fe+2]", "*", "(", "=", "1", "%12", "."]] == [
        True, True, True, True, True, True, False, False, False, False, False,
    ]  # fmt: skip


# --------------------------------------------------------------------------- images


def _image_predictor(model, head, channels=1, size=(28, 28)):
    config = {
        "task": head.to_dict(),
        "output_names": head.output_names,
        "input": {"kind": "image", "channels": channels, "size": list(size)},
        "tokenizer": None,
        "normalization": {"mean": [0.5] * channels, "std": [0.25] * channels},
    }
    return Predictor(model, config, "cpu")


def _cnn(num_outputs=3, channels=1, seed=0):
    torch.manual_seed(seed)
    return ImageCNN(CNNConfig(in_channels=channels, image_size=(28, 28), num_outputs=num_outputs, channels=(8, 16)))


def test_gradcam_and_ig_heatmaps_on_image_cnn():
    head = ClassificationHead(["a", "b", "c"])
    model = Ensemble([_cnn(seed=1), _cnn(seed=2)]).eval()
    p = _image_predictor(model, head)
    rng = np.random.default_rng(0)
    images: list[np.ndarray] = [
        rng.integers(0, 255, (28, 28), dtype=np.uint8),
        rng.random((40, 32, 3)),
        np.zeros((2, 2, 2, 2)),
    ]
    cams = explain_images(p, images)
    assert "error" in cams[2]
    predicted = [int(np.argmax(list(r["probabilities"].values()))) for r in p.predict_images(images[:2])]
    for cam, label in zip(cams[:2], predicted, strict=True):
        heat = cam["heatmap"]
        assert heat.shape == (28, 28)
        assert heat.dtype == np.float32
        assert heat.min() >= 0.0
        assert heat.max() <= 1.0 + 1e-6
        assert cam["target"] == label
        assert cam["output"] == head.output_names[label]
    igs = explain_images(p, images[:2], method="ig", steps=16, target=2)
    for ig in igs:
        assert ig["heatmap"].shape == (28, 28)
        assert ig["target"] == 2
        assert np.abs(ig["heatmap"]).max() == pytest.approx(1.0, abs=1e-5)
        assert ig["heatmap"].min() < 0 < ig["heatmap"].max()  # signed
    with pytest.raises(ValueError, match="method"):
        explain_images(p, images[:1], method="saliency")


def test_image_faithfulness_reports_all_fields():
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "train_images": rng.integers(0, 255, (40, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(40) % 2,
    }
    data = load_image_npz(arrays, split={"train": 0.7, "val": 0.0, "test": 0.3})
    model = _cnn(num_outputs=2).eval()
    result = faithfulness(model, data, max_items=8, seed=3)
    assert result is not None
    assert set(result) == {"top", "random", "ratio", "n", "fraction", "split", "method"}
    assert (result["n"], result["fraction"], result["split"], result["method"]) == (8, 0.2, "test", "gradcam")
    assert result["top"] >= 0
    assert result["random"] >= 0
    regression = faithfulness_images(_cnn(num_outputs=2).eval(), RegressionHead(["a", "b"]), torch.randn(3, 1, 28, 28))
    assert regression["n"] == 6  # every output of every image


# --------------------------------------------------------------------------- faithfulness


def _nitrogen_data():
    """Chains of C/N/O atoms; the target is the number of N atoms."""
    rng = random.Random(0)
    smiles = ["".join(rng.choice("CCCNO") for _ in range(rng.randint(4, 12))) for _ in range(400)]
    df = pd.DataFrame({"smiles": smiles, "n": [s.count("N") for s in smiles]})
    return load_sequence_frame(df, target_columns="n", task="regression", split={"train": 0.8, "test": 0.2})


def test_faithfulness_top_atoms_beat_random_atoms():
    data = _nitrogen_data()
    model = _rnn(data.tokenizer.vocab_size, embedding_dim=8, hidden_size=16, dropout=0.0)
    train = data.train
    assert isinstance(train, SequenceDataset)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(len(train), (64,), generator=gen).tolist()
        (ids, lengths), y = train.__getitems__(batch)
        loss = data.head.loss(model(ids, lengths), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.train()  # faithfulness switches to eval itself and restores the mode
    result = faithfulness(model, data, "cpu", max_items=64, steps=16)
    assert model.training
    assert result is not None
    assert result["n"] == 64
    assert result["split"] == "test"
    assert result["top"] > result["random"], result
    assert result["ratio"] > 1.0


def test_faithfulness_skips_unexplained_inputs():
    data = PreparedData(train=None, val=None, test=None, head=RegressionHead(["y"]), input={"kind": "tokens"})  # type: ignore[arg-type]
    assert faithfulness(_rnn(4), data) is None
    assert EXPLAINABLE_INPUTS == ("smiles", "image")
