"""Ensembles, MC-dropout and test-time SMILES augmentation in the Predictor (issue 12)."""

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from workers.ml.bundle import CONFIG_FILE, bundle_config, load_bundle, save_bundle
from workers.ml.data import load_image_npz, load_sequence_frame
from workers.ml.ensemble import Ensemble, mc_dropout, member_outputs, owner_mean
from workers.ml.models import arch_of, build_model, config_dict
from workers.ml.predict import Predictor
from workers.ml.training import seed_everything

torch.set_num_threads(1)

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "ClCCBr", "CCN(CC)CC", "c1ccncc1", "C1CCCCC1",
          "O=C(O)CCl"] * 3
RNN = {"hidden_size": 8, "embedding_dim": 8, "cell": "gru", "dropout": 0.3}


def _data(task="regression"):
    y = np.arange(len(SMILES), dtype=float) % 5
    df = pd.DataFrame({"smiles": SMILES, "y": y if task == "regression" else y > 2})
    return load_sequence_frame(df, target_columns="y", task=task)


def _bundle(tmp_path, data, members, **params):
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": data.head.num_outputs,
                                **RNN, **params}, members=members)
    save_bundle(tmp_path, model, bundle_config(model, data))
    return model.eval()


def test_ensemble_module_stacks_members_and_describes_member_zero():
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": 12, "num_outputs": 2, **RNN}, members=3)
    assert isinstance(model, Ensemble) and len(model.members) == 3
    assert model.cpu_inputs == (1,)
    assert arch_of(model) == "rnn" and config_dict(model)["hidden_size"] == 8
    assert all(k.startswith("members.") for k in model.state_dict())
    ids, lengths = torch.randint(1, 12, (4, 6)), torch.tensor([6, 3, 1, 5])
    with torch.no_grad():
        out = model.eval()(ids, lengths)
        assert out.shape == (3, 4, 2)
        torch.testing.assert_close(out[1], model.members[1](ids, lengths))
        assert member_outputs(model.members[0], ids, lengths).shape == (1, 4, 2)
    assert not torch.equal(out[0], out[1])  # members start from different weights


def test_ensemble_bundle_predicts_mean_and_spread_with_one_tokenisation(tmp_path, monkeypatch):
    data = _data()
    model = _bundle(tmp_path, data, members=3)
    loaded, config = load_bundle(tmp_path)
    assert config["members"] == 3 and isinstance(loaded, Ensemble)
    p = Predictor.from_bundle(tmp_path, "cpu")
    assert p.members == 3 and p.score_columns() == ["y_std"]

    calls = {"encode": 0, "forward": 0}
    encode = p.tokenizer.encode_batch

    def counting_encode(*a, **k):
        calls["encode"] += 1
        return encode(*a, **k)

    monkeypatch.setattr(p.tokenizer, "encode_batch", counting_encode)
    for m in p.model.members:
        m.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    out = p.predict_smiles(["OCC", "c1ccccc1O", "C1CC("], batch_size=64)
    assert calls == {"encode": 1, "forward": 3}  # one tokenisation, one pass per member

    ids, lengths = data.tokenizer.encode_batch(["CCO", "Oc1ccccc1"])
    with torch.no_grad():
        per_member = model(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()[:, :, 0]
    values = per_member * data.head.std[0] + data.head.mean[0]
    assert out[0]["value"] == pytest.approx(values[:, 0].mean(), abs=1e-5)
    u = out[1]["uncertainty"]
    assert u["method"] == "ensemble" and u["samples"] == 3
    assert u["std"]["y"] == pytest.approx(values[:, 1].std(), abs=1e-5)
    assert "error" in out[2]

    scores, errors, extras = p.score_smiles_full(["CCO", "xx(", "Oc1ccccc1"])
    assert np.isnan(scores[1]).all() and errors[1] and set(extras) == {"y_std"}
    np.testing.assert_allclose(scores[[0, 2], 0], values.mean(0), atol=1e-5)
    np.testing.assert_allclose(extras["y_std"][[0, 2]], values.std(0), atol=1e-5)
    assert np.isnan(extras["y_std"][1])
    np.testing.assert_allclose(p.score_smiles(["CCO"])[0][0, 0], values[:, 0].mean(), atol=1e-5)


def test_old_bundle_without_new_keys_predicts_as_before(tmp_path):
    data = _data("classification")
    model = _bundle(tmp_path, data, members=1)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["members"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    p = Predictor.from_bundle(tmp_path, "cpu")
    assert p.members == 1 and p.score_columns() == [] and p.domain is None
    out = p.predict_smiles(["CCO"])[0]
    ids, lengths = data.tokenizer.encode_batch(["CCO"])
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(ids), torch.from_numpy(lengths)), 1)[0]
    assert [out["probabilities"][c] for c in ("False", "True")] == expected.tolist()  # bit for bit
    assert out["uncertainty"]["method"] is None and out["uncertainty"]["std"] is None
    assert out["uncertainty"]["entropy"] == pytest.approx(float(-(expected * expected.log()).sum()), abs=1e-6)
    assert "interval" not in out and "domain" not in out


def test_mc_dropout_activates_only_dropout_layers():
    model = build_model("cnn", {"in_channels": 1, "image_size": [8, 8], "num_outputs": 2, "channels": [4],
                                "batch_norm": True, "dropout": 0.5}).eval()
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Dropout, nn.BatchNorm2d)):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, mod.training))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), mc_dropout(model):
        a, b = model(x), model(x)
    assert seen == {"dropout": True, "features.0.1": False}
    assert not torch.equal(a, b)
    assert not any(m.training for m in model.modules())  # restored
    with torch.no_grad(), mc_dropout(model):
        torch.testing.assert_close(model(x), a)  # seeded: the same request, the same samples


def test_mc_dropout_prediction_reports_spread_keeps_deterministic_value(tmp_path):
    data = _data()
    _bundle(tmp_path, data, members=1)
    p = Predictor.from_bundle(tmp_path, "cpu")
    plain = p.predict_smiles(["CCO", "c1ccncc1"])
    mc = p.predict_smiles(["CCO", "c1ccncc1"], uncertainty="mc_dropout", mc_samples=8)
    assert mc[0]["value"] == plain[0]["value"]
    assert mc[0]["uncertainty"]["method"] == "mc_dropout" and mc[0]["uncertainty"]["samples"] == 8
    assert mc[0]["uncertainty"]["std"]["y"] > 0
    assert mc == p.predict_smiles(["CCO", "c1ccncc1"], uncertainty="mc_dropout", mc_samples=8)
    ids, lengths = data.tokenizer.encode_batch(["CCO"])
    assert p.raw_outputs(torch.from_numpy(ids), torch.from_numpy(lengths), mc_samples=5).shape == (5, 1, 1)
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        p.predict_smiles(["CCO"], uncertainty="bayes")


def test_mc_dropout_refused_without_dropout(tmp_path):
    data = _data()
    _bundle(tmp_path, data, members=1, dropout=0.0)
    p = Predictor.from_bundle(tmp_path, "cpu")
    assert not p.supports_mc_dropout
    with pytest.raises(ValueError, match="no dropout"):
        p.predict_smiles(["CCO"], uncertainty="mc_dropout")


@pytest.fixture()
def fake_augment(monkeypatch):
    """Stands in for workers/ml/augment.py (H2's) with its signature: variants(smiles, n, seed)."""
    import random

    from rdkit import Chem

    def variants(smiles, n, seed):
        mol, rng = Chem.MolFromSmiles(smiles), random.Random(seed)
        order = list(range(mol.GetNumAtoms()))
        out = []
        for _ in range(n):
            rng.shuffle(order)
            out.append(Chem.MolToSmiles(Chem.RenumberAtoms(mol, order), canonical=False))
        return out

    module = types.ModuleType("workers.ml.augment")
    module.variants = variants
    monkeypatch.setitem(sys.modules, "workers.ml.augment", module)
    return variants


def test_tta_averages_over_random_smiles_views(tmp_path, fake_augment):
    data = _data()
    _bundle(tmp_path, data, members=1)
    p = Predictor.from_bundle(tmp_path, "cpu")
    out = p.predict_smiles(["c1ccccc1O", "CCN(CC)CC"], tta=4)
    views = ["Oc1ccccc1", *fake_augment("Oc1ccccc1", 4, 0)]
    per_view = p.predict_ids(*data.tokenizer.encode_batch(views))[:, 0]
    assert out[0]["value"] == pytest.approx(per_view.mean(), abs=1e-5)
    u = out[0]["uncertainty"]
    assert u["method"] == "tta" and u["samples"] == 5 and u["tta"] == 4
    assert u["std"]["y"] == pytest.approx(per_view.std(), abs=1e-5)
    scores, _, _ = p.score_smiles_full(["c1ccccc1O"], tta=4)
    assert scores[0, 0] == pytest.approx(per_view.mean(), abs=1e-5)


def test_image_ensemble_and_mc_dropout(tmp_path):
    rng = np.random.default_rng(0)
    data = load_image_npz({"train_images": rng.integers(0, 256, (20, 8, 8), dtype=np.uint8),
                           "train_labels": rng.integers(0, 3, 20)})
    seed_everything(0)
    model = build_model("cnn", {"in_channels": 1, "image_size": [8, 8], "num_outputs": 3, "channels": [4]},
                        members=2)
    save_bundle(tmp_path, model, bundle_config(model, data))
    p = Predictor.from_bundle(tmp_path, "cpu")
    img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    out = p.predict_images([img, np.zeros((5, 5, 7))])
    assert out[0]["uncertainty"]["method"] == "ensemble" and set(out[0]["uncertainty"]["std"]) == {"0", "1", "2"}
    assert sum(out[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "error" in out[1]
    mc = p.predict(np.stack([img, img]), uncertainty="mc_dropout", mc_samples=4)
    assert mc[0]["uncertainty"]["samples"] == 8  # 4 passes x 2 members
    with pytest.raises(ValueError, match="SMILES models only"):
        p.predict_images([img], tta=2)


def test_owner_mean_groups_views():
    v = np.arange(12, dtype=float).reshape(1, 6, 2)
    out = owner_mean(v, np.array([0, 0, 1, 1, 1, 2]), 3)
    np.testing.assert_allclose(out[0], [[1, 2], [6, 7], [10, 11]])
