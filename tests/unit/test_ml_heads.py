import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from workers.ml.heads import ClassificationHead, MultilabelHead, RegressionHead, Head


def test_binary_classification_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 2)).astype(np.float32)
    y = rng.integers(0, 2, 50)
    task = ClassificationHead(["inactive", "active"])
    m = task.metrics(logits, y)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))


def test_multiclass_auc_macro_ovr_and_missing_class():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(60, 3)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    task = ClassificationHead(["a", "b", "c"])
    probs = task.transform(logits)
    assert task.metrics(logits, y)["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    y_missing = np.where(y == 2, 0, y)  # class "c" absent from this split
    m = task.metrics(logits, y_missing)
    assert m["roc_auc"] is not None and 0 <= m["roc_auc"] <= 1
    assert task.metrics(logits, np.zeros(60, dtype=int))["roc_auc"] is None  # one class only


def test_multilabel_masks_missing_targets():
    task = MultilabelHead(["tox1", "tox2"])
    outputs = torch.tensor([[5.0, -5.0], [-5.0, 100.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    assert float(task.loss(outputs, targets)) < 0.01  # the wrong but missing tox2 labels are ignored
    m = task.metrics(outputs.numpy(), targets.numpy())
    assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0
    preds = task.predictions(outputs.numpy())
    assert preds[0]["labels"] == ["tox1"] and set(preds[1]["probabilities"]) == {"tox1", "tox2"}


def test_regression_standardises_and_reports_original_units():
    y = np.array([[10.0], [20.0], [30.0], [40.0]])
    task = RegressionHead(["pIC50"]).fit(y)
    enc = task.encode_targets(y)
    assert abs(float(enc.mean())) < 1e-6 and abs(float(enc.std(unbiased=False)) - 1) < 1e-5
    outputs = enc.numpy() + 0.1  # off by 0.1 std in standardised space
    m = task.metrics(outputs, enc.numpy())
    assert m["rmse"] == pytest.approx(0.1 * task.std[0], rel=1e-4)
    assert m["mae"] == pytest.approx(0.1 * task.std[0], rel=1e-4)
    assert task.predictions(enc.numpy())[2]["value"] == pytest.approx(30.0, rel=1e-5)


def test_task_dict_round_trip():
    for task in (ClassificationHead(["x", "y"]), MultilabelHead(["a"]), RegressionHead(["v"], [1.5], [2.0])):
        back = Head.from_dict(task.to_dict())
        assert back.to_dict() == task.to_dict() and back.output_names == task.output_names
