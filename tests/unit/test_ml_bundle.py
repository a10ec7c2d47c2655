import json

import numpy as np
import pandas as pd
import pytest
import torch

from workers.ml.bundle import CONFIG_FILE, WEIGHTS_FILE, bundle_config, load_bundle, save_bundle
from workers.ml.data import load_image_npz, load_sequence_frame
from workers.ml.models import build_model
from workers.ml.predict import Predictor
from workers.ml.training import TrainConfig, fit, seed_everything

# Tiny models: one thread is faster than two contended ones on a shared CI box.
torch.set_num_threads(1)

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "ClCCBr", "C[C@H](N)C(=O)O", "CCN(CC)CC",
          "c1ccncc1", "C1CCCCC1", "O=C(O)CCl", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"] * 4


@pytest.fixture(scope="module")
def smiles_bundle(tmp_path_factory):
    df = pd.DataFrame({"smiles": SMILES, "active": [i % 3 == 0 for i in range(len(SMILES))]})
    data = load_sequence_frame(df, target_columns="active")
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 2, "cell": "lstm",
                                "bidirectional": True, "hidden_size": 16, "embedding_dim": 8})
    result = fit(model, data, TrainConfig(epochs=2, batch_size=8))
    path = tmp_path_factory.mktemp("bundle")
    save_bundle(path, model, bundle_config(model, data, metrics=result["test"]))
    return path, model.eval(), data


def test_bundle_layout_and_plain_files(smiles_bundle):
    path, _, _ = smiles_bundle
    assert (path / WEIGHTS_FILE).exists()
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["arch"] == "rnn" and config["model"]["cell"] == "lstm"
    assert config["task"] == {"type": "classification", "class_names": ["False", "True"]}
    assert config["input"]["kind"] == "smiles" and config["tokenizer"]["type"] == "smiles"
    assert config["tokenizer"]["vocab"][:2] == ["<pad>", "<unk>"]
    assert config["output_names"] == ["p_False", "p_True"]


def test_bundle_round_trip_identical_predictions(smiles_bundle, monkeypatch):
    path, model, data = smiles_bundle
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("bundles must not use torch.load"))
    loaded, config = load_bundle(path, "cpu")
    (ids, lengths), _ = data.train.__getitems__(list(range(len(data.train))))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, lengths), model(ids, lengths), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])


def test_predict_smiles_reports_invalid_and_canonicalises(smiles_bundle):
    path, model, data = smiles_bundle
    p = Predictor.from_bundle(path, "cpu")
    out = p.predict_smiles(["OCC", "C1CC(", "C[N](C)(C)(C)C", "", "CCO"])
    assert out[0]["smiles"] == "CCO" and out[0]["label"] in ("False", "True")
    assert out[0]["probabilities"] == pytest.approx(out[4]["probabilities"])  # same molecule
    assert "syntax error" in out[1]["error"]
    assert "valence" in out[2]["error"]
    assert out[3]["error"] == "empty SMILES"
    ids, lengths = data.tokenizer.encode_batch(["CCO"])
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(ids), torch.from_numpy(lengths)), 1)[0, 1]
    assert out[0]["probabilities"]["True"] == pytest.approx(float(expected), abs=1e-6)


def test_predict_ids_bucketing_matches_one_batch(smiles_bundle):
    path, _, data = smiles_bundle
    p = Predictor.from_bundle(path, "cpu")
    ids, lengths = data.tokenizer.encode_batch(SMILES)
    np.testing.assert_allclose(p.predict_ids(ids, lengths, batch_size=3), p.predict_ids(ids, lengths), atol=1e-6)
    scores, errors = p.score_smiles(["CCO", "xx(", "c1ccccc1O"])
    assert np.isnan(scores[1]).all() and errors[1] and errors[0] is None
    np.testing.assert_allclose(scores[[0, 2]], p.predict_ids(*data.tokenizer.encode_batch(["CCO", "Oc1ccccc1"])),
                               atol=1e-6)


def test_image_bundle_and_image_conversion(tmp_path):
    rng = np.random.default_rng(0)
    data = load_image_npz({"train_images": rng.integers(0, 256, (30, 10, 10, 3), dtype=np.uint8),
                           "train_labels": rng.integers(0, 2, 30)})
    seed_everything(0)
    model = build_model("cnn", {"in_channels": 3, "image_size": [10, 10], "num_outputs": 2, "channels": [4]})
    save_bundle(tmp_path, model, bundle_config(model, data))
    p = Predictor.from_bundle(tmp_path, "cpu")
    (x, ), _ = data.train.__getitems__([0])
    raw = data.train.images[0].permute(1, 2, 0).numpy()  # HWC uint8, as a user would send it
    out = p.predict_images([raw, raw[:, :, 0], np.zeros((40, 30), np.float32), np.zeros((5, 5, 7))])
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), 1)[0].tolist()
    assert list(out[0]["probabilities"].values()) == pytest.approx(expected, abs=1e-6)
    assert {"label", "probabilities", "uncertainty"} == set(out[1]) == set(out[2])
    assert "error" in out[3]
    with pytest.raises(ValueError):
        p.predict_smiles(["CCO"])


def test_ensemble_bundle_reference_and_member_checks(tmp_path):
    from workers.ml.bundle import REFERENCE_FILE, load_reference
    from workers.ml.ensemble import Ensemble

    params = {"vocab_size": 10, "num_outputs": 2, "hidden_size": 4, "embedding_dim": 4}
    seed_everything(0)
    model = build_model("rnn", params, members=2)
    config = {"task": {"type": "classification", "class_names": ["a", "b"]}}
    ref = {"fingerprints": torch.zeros(3, 256, dtype=torch.uint8)}
    save_bundle(tmp_path, model, config, reference=ref)
    loaded, saved = load_bundle(tmp_path)
    assert saved["members"] == 2 and isinstance(loaded, Ensemble)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert torch.equal(load_reference(tmp_path)["fingerprints"], ref["fingerprints"])
    save_bundle(tmp_path, model, config)  # saved again without a reference: none is left behind
    assert not (tmp_path / REFERENCE_FILE).exists() and load_reference(tmp_path) == {}
    mixed = Ensemble([build_model("rnn", params), build_model("rnn", {**params, "hidden_size": 6})])
    with pytest.raises(ValueError, match="share one architecture"):
        save_bundle(tmp_path / "mixed", mixed, config)
