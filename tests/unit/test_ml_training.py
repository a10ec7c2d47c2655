import ast
import pathlib

import numpy as np
import pandas as pd
import pytest
import torch

import workers.ml
from workers.ml import training
from workers.ml.data import load_image_npz, load_sequence_frame
from workers.ml.models import build_model
from workers.ml.training import TrainConfig, TrainingCancelled, fit, load_checkpoint, seed_everything

# Tiny models: one thread is faster than two contended ones on a shared CI box.
torch.set_num_threads(1)


def _image_data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 12, 12), dtype=np.uint8)
    y = rng.integers(0, 3, n)
    for i in range(n):
        x[i, :, y[i] * 4:y[i] * 4 + 4] += 150  # class = which third of the image is bright
    return load_image_npz({"train_images": x, "train_labels": y}, seed=seed)


def _cnn(data, seed=0):
    seed_everything(seed)
    return build_model("cnn", {"in_channels": 1, "image_size": [12, 12], "num_outputs": 3,
                               "channels": [4, 8], "hidden": 16})


def _counting_data():
    rng = np.random.default_rng(0)
    smiles, y = [], []
    for _ in range(400):
        atoms = rng.choice(["C", "N", "O"], size=rng.integers(2, 12), p=[0.6, 0.2, 0.2])
        smiles.append("".join(atoms))
        y.append((atoms == "C").sum() - 0.5 * (atoms == "O").sum() + rng.normal(0, 0.1))
    return load_sequence_frame(pd.DataFrame({"smiles": smiles, "y": y}), target_columns="y", task="regression")


def test_regression_beats_the_mean():
    data = _counting_data()
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1,
                                "embedding_dim": 16, "hidden_size": 32, "dropout": 0.0})
    result = fit(model, data, TrainConfig(epochs=8, batch_size=32, lr=1e-2))
    _, y_std = data.test.__getitems__(list(range(len(data.test))))
    y = y_std.numpy()[:, 0] * data.head.std[0] + data.head.mean[0]
    baseline_rmse = float(np.sqrt(np.mean((y - data.head.mean[0]) ** 2)))  # predict the train mean
    assert result["test"]["rmse"] < 0.5 * baseline_rmse
    assert result["test"]["r2"] > 0.5
    assert result["epochs_trained"] == 8 and len(result["history"]) == 8


def test_same_seed_same_metrics():
    data = _image_data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, seed=7)
    a = fit(_cnn(data, 7), data, cfg)
    b = fit(_cnn(data, 7), data, cfg)
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"]) and a["test"] == b["test"]


def test_resume_continues_epoch_counter_and_matches_uninterrupted_run(tmp_path):
    data = _image_data()
    cfg = TrainConfig(epochs=5, batch_size=16, lr=3e-3, scheduler="cosine")
    reference = fit(_cnn(data), data, cfg, checkpoint_path=tmp_path / "ref.pt")

    ckpt = tmp_path / "run.pt"
    seen, calls_after_epoch_3 = [], []

    def on_epoch(epoch, metrics):
        seen.append(epoch)

    def kill_in_epoch_4():  # "killed" a few batches into epoch 4
        if seen[-1:] == [3]:
            calls_after_epoch_3.append(1)
        return len(calls_after_epoch_3) > 2

    with pytest.raises(TrainingCancelled):
        fit(_cnn(data), data, cfg, checkpoint_path=ckpt, should_stop=kill_in_epoch_4, on_epoch=on_epoch)
    assert seen == [1, 2, 3]
    assert load_checkpoint(ckpt)["epoch"] == 3

    # A new attempt builds a differently initialised model; the checkpoint wins.
    progress = []
    resumed = fit(_cnn(data, seed=99), data, cfg, checkpoint_path=ckpt,
                  on_epoch=lambda e, m: seen.append(e), on_progress=lambda f, msg, eta: progress.append(f))
    assert seen == [1, 2, 3, 4, 5]
    assert resumed["epochs_trained"] == 5 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert progress[-1] == 1.0
    assert resumed["test"] == reference["test"]
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in reference["history"]]

    again = fit(_cnn(data), data, cfg, checkpoint_path=ckpt, on_epoch=lambda e, m: seen.append(e))
    assert seen == [1, 2, 3, 4, 5] and again["epochs_trained"] == 5


def test_on_epoch_metrics_and_early_stopping(tmp_path):
    data = _counting_data()
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "dropout": 0.0,
                                "hidden_size": 8, "embedding_dim": 4})
    # An lr far below float32 resolution: weights never change, so val loss never improves.
    cfg = TrainConfig(epochs=6, batch_size=64, optimizer="sgd", momentum=0.0, lr=1e-30, early_stopping_patience=2)
    epochs = []
    result = fit(model, data, cfg, checkpoint_path=tmp_path / "c.pt", on_epoch=lambda e, m: epochs.append(m))
    assert [m["epoch"] for m in epochs] == [1, 2, 3] and result["stopped_early"] and result["best_epoch"] == 1
    assert {"train_loss", "val_loss", "val_rmse", "val_mae", "val_r2", "epoch", "epoch_seconds"} <= set(epochs[0])
    # Resuming a stopped run trains nothing more.
    assert fit(model, data, cfg, checkpoint_path=tmp_path / "c.pt")["epochs_trained"] == 3


def test_checkpoint_is_plain_data(tmp_path):
    data = _image_data(n=40)
    fit(_cnn(data), data, TrainConfig(epochs=1, batch_size=16, scheduler="plateau"), checkpoint_path=tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "best_model", "config", "rng", "history"} <= set(ckpt)
    assert ckpt["config"]["epochs"] == 1


def test_torch_load_only_with_weights_only(tmp_path, monkeypatch):
    # Static: every torch.load call in the library passes weights_only=True.
    for path in pathlib.Path(workers.ml.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, \
                    f"{path.name}:{node.lineno} calls torch.load without weights_only=True"
    # Dynamic: a resumed fit loads its checkpoint that way.
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    data = _image_data(n=40)
    cfg = TrainConfig(epochs=1, batch_size=16)
    fit(_cnn(data), data, cfg, checkpoint_path=tmp_path / "c.pt")
    fit(_cnn(data), data, TrainConfig(epochs=2, batch_size=16), checkpoint_path=tmp_path / "c.pt")
    assert calls == [True]


def test_resolve_device():
    assert training.resolve_device("cpu").type == "cpu"
    assert training.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            training.resolve_device("cuda")
    with pytest.raises(ValueError):
        TrainConfig(optimizer="lbfgs")
