"""Conformal intervals, temperature scaling and prediction sets, stored with the version (issue 12)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from workers.ml import calibration as cal
from workers.ml import quality
from workers.ml.bundle import CONFIG_FILE, bundle_config, load_reference, save_bundle
from workers.ml.data import load_image_npz, load_sequence_frame
from workers.ml.models import build_model
from workers.ml.predict import Predictor
from workers.ml.training import TrainConfig, fit, seed_everything

torch.set_num_threads(1)


def _coverage(lo, hi, y):
    return float(((lo <= y) & (y <= hi)).mean())


def test_regression_interval_covers_requested_fraction_of_fresh_samples():
    rng = np.random.default_rng(0)
    mu_cal, mu_new = rng.normal(size=(2000, 1)), rng.normal(size=(20000, 1))
    y_cal, y_new = mu_cal + rng.standard_t(4, size=mu_cal.shape), mu_new + rng.standard_t(4, size=mu_new.shape)
    c = cal.fit_regression(mu_cal, y_cal, ["y"])
    assert c["n"] == {"y": 2000} and not c["normalized"]
    for coverage in (0.8, 0.9, 0.95):
        lo, hi = cal.regression_interval(json.loads(json.dumps(c)), mu_new, ["y"], coverage)
        assert abs(_coverage(lo, hi, y_new) - coverage) <= 0.03


def test_normalised_interval_follows_the_spread():
    rng = np.random.default_rng(1)
    sigma_cal, sigma_new = rng.uniform(0.1, 2.0, (2000, 1)), rng.uniform(0.1, 2.0, (20000, 1))
    y_cal, y_new = rng.normal(0, sigma_cal), rng.normal(0, sigma_new)
    c = cal.fit_regression(np.zeros_like(y_cal), y_cal, ["y"], spread=sigma_cal)
    assert c["normalized"] and c["eps"]["y"] > 0
    lo, hi = cal.regression_interval(c, np.zeros_like(y_new), ["y"], 0.9, spread=sigma_new)
    assert abs(_coverage(lo, hi, y_new) - 0.9) <= 0.03
    width = (hi - lo)[:, 0]
    assert width[sigma_new[:, 0] > 1.5].mean() > 3 * width[sigma_new[:, 0] < 0.5].mean()
    with pytest.raises(ValueError, match="spread"):
        cal.regression_interval(c, np.zeros_like(y_new), ["y"], 0.9)


def test_conformal_quantile_rank_and_subsampled_storage(monkeypatch):
    scores = [float(i) for i in range(1, 20)]  # n = 19
    assert cal.conformal_quantile(scores, 19, 0.9) == 18.0  # ceil(20 * 0.9) = 18th smallest
    assert cal.conformal_quantile(scores, 19, 0.99) == 19.0  # rank past n: the largest
    with pytest.raises(ValueError):
        cal.conformal_quantile(scores, 19, 1.0)
    monkeypatch.setattr(cal, "MAX_SCORES", 50)
    full = np.sort(np.random.default_rng(2).exponential(size=1000))
    stored = cal._stored_scores(full)
    assert len(stored) == 50 and stored[0] == full[0] and stored[-1] == full[-1]
    for coverage in (0.5, 0.8, 0.9):
        exact = full[math.ceil(1001 * coverage) - 1]
        assert exact <= cal.conformal_quantile(stored, 1000, coverage) <= full[math.ceil(1001 * coverage) + 20]


def _overconfident(n, rng, k=3):
    true_logits = rng.normal(size=(n, k)) * 1.5
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    model_logits = 4.0 * true_logits  # far too sure of itself
    probs = np.exp(model_logits - model_logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True), y


def test_temperature_scaling_lowers_ece_and_sets_cover():
    rng = np.random.default_rng(3)
    p_val, y_val = _overconfident(3000, rng)
    p_test, y_test = _overconfident(5000, rng)
    c = cal.fit_classification(p_val, y_val)
    assert c["temperature"] == pytest.approx(4.0, rel=0.2)
    after = cal.calibrate_probabilities(c, p_test)
    before_ece, after_ece = cal.expected_calibration_error(p_test, y_test), cal.expected_calibration_error(after, y_test)
    assert after_ece < before_ece / 3 and after_ece < 0.03
    np.testing.assert_allclose(after.sum(1), 1.0, atol=1e-5)
    sets = cal.prediction_sets(c, after, 0.9)
    assert abs(np.mean([t in s for t, s in zip(y_test, sets, strict=True)]) - 0.9) <= 0.03
    assert all(len(s) >= 1 for s in sets)


def test_temperature_of_a_calibrated_model_stays_near_one_and_multilabel():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4000, 2)) * 2
    p = 1 / (1 + np.exp(-logits))
    y = (rng.random(p.shape) < p).astype(float)
    y[::7, 1] = np.nan
    over = 1 / (1 + np.exp(-3 * logits))
    c = cal.fit_multilabel(over, y, ["a", "b"])
    assert c["temperature"]["a"] == pytest.approx(3.0, rel=0.2)
    assert cal.binary_calibration_error(cal.calibrate_probabilities(c, over, ["a", "b"]), y) < 0.5 * (
        cal.binary_calibration_error(over, y))
    pc = np.stack([1 - p[:, 0], p[:, 0]], 1)
    assert cal.fit_classification(pc, y[:, 0].astype(int))["temperature"] == pytest.approx(1.0, abs=0.15)


SMILES = ["CCO", "CCCO", "CCCCO", "CCCCCO", "c1ccccc1", "c1ccccc1C", "c1ccccc1CC", "c1ccccc1O", "CC(=O)O",
          "CCC(=O)O", "CCCC(=O)O", "CCN", "CCCN", "CCCCN", "c1ccncc1", "c1ccncc1C", "C1CCCCC1", "C1CCCCC1C",
          "ClCCCl", "BrCCBr", "CCOC", "CCOCC", "CC(C)O", "CC(C)CO", "OCCO", "NCCN", "c1ccc2ccccc2c1",
          "CC(=O)Nc1ccccc1", "COc1ccccc1", "Oc1ccc(O)cc1"]


def _regression_data():
    rng = np.random.default_rng(5)
    y = [len(s) / 3 + rng.normal(0, 0.3) for s in SMILES] * 3
    return load_sequence_frame(pd.DataFrame({"smiles": SMILES * 3, "y": y}), target_columns="y", task="regression",
                               split={"train": 0.6, "val": 0.2, "test": 0.2})


def test_quality_package_travels_with_the_bundle(tmp_path):
    data = _regression_data()
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": 8,
                                "embedding_dim": 8}, members=3)
    for member in model.members:
        fit(member, data, TrainConfig(epochs=2, batch_size=16))
    pkg = quality.package(model, data, "cpu", coverage=0.9)
    assert pkg.calibration["type"] == "regression" and pkg.calibration["normalized"]
    assert pkg.calibration["n"] == {"y": len(data.val)}
    assert pkg.domain["type"] == "morgan_tanimoto" and 0 < pkg.domain["threshold"] <= 1
    assert pkg.reference["fingerprints"].dtype == torch.uint8 and pkg.reference["fingerprints"].shape[1] == 256
    m = pkg.metrics
    assert m["uncertainty"]["method"] == "ensemble" and m["uncertainty"]["members"] == 3
    assert -1 <= m["uncertainty"]["spread_error_spearman"] <= 1
    assert 0 <= m["calibration"]["test_coverage"] <= 1 and m["calibration"]["test_mean_width"] > 0
    assert set(m["domain"]) >= {"threshold", "test_in_domain_fraction", "test_error_in_domain",
                                "test_error_out_of_domain"}

    save_bundle(tmp_path, model, bundle_config(model, data, calibration=pkg.calibration, domain=pkg.domain,
                                               metrics=m), reference=pkg.reference)
    assert torch.equal(load_reference(tmp_path)["fingerprints"], pkg.reference["fingerprints"])
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["calibration"]["scores"]["y"]
    p = Predictor.from_bundle(tmp_path, "cpu")
    assert p.score_columns() == ["y_std", "y_lo", "y_hi", "nn_similarity", "in_domain"]
    train_mol, far = data.texts["train"][0], "FC(F)(F)C(F)(F)C(F)(F)C(F)(F)F"
    out = p.predict_smiles([train_mol, far], coverage=0.8)
    lo, hi = out[0]["interval"]["values"]["y"]
    assert out[0]["interval"]["coverage"] == 0.8 and lo < out[0]["value"] < hi
    wide = p.predict_smiles([train_mol], coverage=0.95)[0]["interval"]["values"]["y"]
    assert wide[0] <= lo and wide[1] >= hi
    assert out[0]["domain"] == {"nn_similarity": 1.0, "in_domain": True, "threshold": pkg.domain["threshold"]}
    assert out[1]["domain"]["nn_similarity"] < pkg.domain["threshold"] and not out[1]["domain"]["in_domain"]

    from workers.ml.domain import morgan_packed

    smiles = [train_mol, "C1CC(", far]
    scores, errors, extras = p.score_smiles_full(smiles)
    given = p.score_smiles_full(smiles, fingerprints=morgan_packed(smiles))[2]
    assert errors[1] and np.isnan(scores[1]).all() and all(np.isnan(v[1]) for v in extras.values())
    assert extras["in_domain"][[0, 2]].tolist() == [1.0, 0.0] and extras["nn_similarity"][0] == 1.0
    assert extras["y_lo"][0] == pytest.approx(p.predict_smiles([train_mol])[0]["interval"]["values"]["y"][0])
    for k in extras:
        np.testing.assert_array_equal(extras[k], given[k])


def test_quality_package_for_image_classification(tmp_path):
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 60)
    images = rng.integers(0, 60, (60, 8, 8), dtype=np.uint8) + (labels * 150).astype(np.uint8)[:, None, None]
    data = load_image_npz({"train_images": images, "train_labels": labels}, split={"train": 0.5, "val": 0.25,
                                                                                   "test": 0.25})
    seed_everything(0)
    model = build_model("cnn", {"in_channels": 1, "image_size": [8, 8], "num_outputs": 2, "channels": [4],
                                "hidden": 8})
    fit(model, data, TrainConfig(epochs=3, batch_size=8))
    pkg = quality.package(model, data, "cpu")
    assert pkg.calibration["type"] == "classification" and pkg.calibration["temperature"] > 0
    assert pkg.reference["embeddings"].shape == (len(data.train), 8)
    assert pkg.domain["type"] == "embedding_distance"
    m = pkg.metrics
    assert m["uncertainty"]["spread_error_spearman"] is None and "mc_dropout_spread_error_spearman" in m["uncertainty"]
    assert {"test_ece_before", "test_ece_after", "test_set_coverage"} <= set(m["calibration"])
    assert m["domain"]["error"] == "error_rate"

    save_bundle(tmp_path, model, bundle_config(model, data, calibration=pkg.calibration, domain=pkg.domain),
                reference=pkg.reference)
    p = Predictor.from_bundle(tmp_path, "cpu")
    train_image = data.train.images[0, 0].numpy()
    out = p.predict_images([train_image, np.full((8, 8), 255, np.uint8)], prediction_sets=True)
    assert out[0]["domain"]["nn_distance"] == pytest.approx(0.0, abs=1e-3) and out[0]["domain"]["in_domain"]
    assert out[1]["domain"]["nn_distance"] > 0
    assert set(out[0]["prediction_set"]) <= {"0", "1"} and out[0]["prediction_set"]


def test_multilabel_package_calibrates_each_label(tmp_path):
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"smiles": SMILES * 2, "a": rng.integers(0, 2, 60).astype(float),
                       "b": rng.integers(0, 2, 60).astype(float)})
    df.loc[::5, "b"] = np.nan
    data = load_sequence_frame(df, target_columns=["a", "b"], task="multilabel",
                               split={"train": 0.6, "val": 0.2, "test": 0.2})
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 2, "hidden_size": 8,
                                "embedding_dim": 8})
    fit(model, data, TrainConfig(epochs=2, batch_size=16))
    pkg = quality.package(model, data, "cpu")
    assert set(pkg.calibration["temperature"]) == {"a", "b"}
    assert {"test_ece_before", "test_ece_after"} <= set(pkg.metrics["calibration"])
    assert pkg.metrics["uncertainty"]["method"] is None and pkg.metrics["uncertainty"]["spread_error_spearman"] is None
    save_bundle(tmp_path, model, bundle_config(model, data, calibration=pkg.calibration, domain=pkg.domain),
                reference=pkg.reference)
    p = Predictor.from_bundle(tmp_path, "cpu")
    out = p.predict_smiles(["CCO"], uncertainty="mc_dropout", mc_samples=4)[0]
    ids, lengths = data.tokenizer.encode_batch(["CCO"])
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(ids), torch.from_numpy(lengths))[0].numpy()
    expected = 1 / (1 + np.exp(-logits / np.array([pkg.calibration["temperature"][n] for n in ("a", "b")])))
    assert [out["probabilities"][n] for n in ("a", "b")] == pytest.approx(expected.tolist(), abs=1e-5)
    assert set(out["uncertainty"]["std"]) == {"a", "b"} and "entropy" not in out["uncertainty"]
    assert out["domain"]["in_domain"] in (True, False)
