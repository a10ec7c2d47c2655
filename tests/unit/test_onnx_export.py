"""ONNX export (workers/ml/onnx_export.py): every CNN/RNN variant agrees with PyTorch within
1e-4 in ONNX Runtime, padding never changes a result, and the exported file scores molecules
in a clean interpreter that has neither MedMaaS nor torch."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from workers.ml import onnx_export
from workers.ml.bundle import bundle_config, read_bundle_config, save_bundle
from workers.ml.data import load_image_npz, load_sequence_frame
from workers.ml.ensemble import Ensemble, member_outputs
from workers.ml.models import build_model
from workers.ml.onnx_export import MAX_ABS_DIFF, ONNX_FILE, OPSET, export_bundle, export_checked, export_graph
from workers.ml.predict import Predictor
from workers.ml.training import seed_everything

torch.set_num_threads(1)

SMILES = [
    "CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "ClCCBr", "C[C@H](N)C(=O)O", "CCN(CC)CC", "c1ccncc1",
    "C1CCCCC1", "O=C(O)CCl", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "CN1CCC[C@H]1c1cccnc1", "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O",
] * 3  # fmt: skip


def smiles_data(task="classification"):
    values = [i % 3 == 0 for i in range(len(SMILES))] if task == "classification" else np.linspace(-2, 5, len(SMILES))
    df = pd.DataFrame({"smiles": SMILES, "y": values})
    return load_sequence_frame(df, target_columns="y", task=task)


def rnn(data, members=1, **params):
    seed_everything(0)
    params = {"vocab_size": data.tokenizer.vocab_size, "num_outputs": data.head.num_outputs, "hidden_size": 12,
              "embedding_dim": 6, **params}  # fmt: skip
    return build_model("rnn", params, members=members).eval()


def session(onnx_bytes):
    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def torch_raw(model, *inputs):
    with torch.no_grad():
        return member_outputs(model, *inputs).numpy()


def padded(ids, lengths, width):
    out = np.zeros((len(ids), width), dtype=np.int64)
    out[:, : ids.shape[1]] = ids
    return out, lengths


@pytest.mark.parametrize(
    ("cell", "bidirectional", "layers"),
    [("gru", False, 1), ("gru", True, 2), ("lstm", False, 2), ("lstm", True, 1), ("lstm", True, 2), ("rnn", True, 1)],
)
def test_rnn_matches_packed_pytorch_on_variable_lengths(cell, bidirectional, layers):
    data = smiles_data()
    model = rnn(data, cell=cell, bidirectional=bidirectional, num_layers=layers, dropout=0.2)
    config = bundle_config(model, data)
    onnx_bytes, info = export_checked(model, config, data)
    assert info["opset"] == OPSET
    assert info["checked_on"] == "val"
    assert info["rows_checked"] == len(data.val)
    assert info["max_abs_diff"] <= MAX_ABS_DIFF
    assert [i["name"] for i in info["inputs"]] == ["ids", "lengths"]
    # Every molecule in one batch of mixed lengths, then the same rows with 17 extra padding
    # columns: ONNX Runtime equals the packed PyTorch model and padding changes nothing.
    ids, lengths = data.tokenizer.encode_batch(SMILES[:12])
    assert len(set(lengths.tolist())) > 5
    expected = torch_raw(model, torch.from_numpy(ids), torch.from_numpy(lengths))
    s = session(onnx_bytes)
    for width in (ids.shape[1], ids.shape[1] + 17):
        raw, values = s.run(None, dict(zip(("ids", "lengths"), padded(ids, lengths, width), strict=True)))
        assert raw.shape == (1, 12, 2)
        assert values.shape == (12, 2)
        np.testing.assert_allclose(raw, expected, atol=MAX_ABS_DIFF, rtol=0)
        np.testing.assert_allclose(values, data.head.transform(expected[0]), atol=MAX_ABS_DIFF, rtol=0)
    # one row alone (batch 1) and an empty row (read as one <pad>, as PyTorch does)
    one = s.run(["raw"], {"ids": ids[3:4, : lengths[3]], "lengths": lengths[3:4]})[0]
    np.testing.assert_allclose(one[0, 0], expected[0, 3], atol=MAX_ABS_DIFF, rtol=0)
    empty = np.zeros((2, 4), dtype=np.int64), np.array([0, 0])
    np.testing.assert_allclose(
        s.run(["raw"], {"ids": empty[0], "lengths": empty[1]})[0],
        torch_raw(model, torch.from_numpy(empty[0]), torch.from_numpy(empty[1])),
        atol=MAX_ABS_DIFF,
        rtol=0,
    )


def test_ensemble_regressor_outputs_members_and_values_in_target_units():
    data = smiles_data("regression")
    model = rnn(data, members=3, cell="gru", bidirectional=True)
    assert isinstance(model, Ensemble)
    config = {**bundle_config(model, data), "members": 3}
    onnx_bytes, info = export_checked(model, config, data)
    assert info["max_abs_diff"] <= MAX_ABS_DIFF
    ids, lengths = data.tokenizer.encode_batch(SMILES[:9])
    raw, values = session(onnx_bytes).run(None, {"ids": ids, "lengths": lengths})
    expected = torch_raw(model, torch.from_numpy(ids), torch.from_numpy(lengths))
    assert raw.shape == (3, 9, 1)
    np.testing.assert_allclose(raw, expected, atol=MAX_ABS_DIFF, rtol=0)
    in_units = np.mean([data.head.transform(r) for r in expected], axis=0)
    assert np.abs(in_units).max() > 0.5  # de-standardised, not raw
    np.testing.assert_allclose(values, in_units, atol=MAX_ABS_DIFF, rtol=0)
    meta = {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}
    assert meta["medmaas.members"] == "3"
    assert json.loads(meta["medmaas.task"])["type"] == "regression"


def image_data(n=40, task="classification"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 12, 10, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=n)
    import io

    buf = io.BytesIO()
    np.savez(buf, train_images=images, train_labels=labels)
    buf.seek(0)
    return load_image_npz(buf, task=task)


@pytest.mark.parametrize("members", [1, 2])
def test_cnn_classifier_single_and_ensemble(members):
    data = image_data()
    seed_everything(0)
    params = {"in_channels": 3, "image_size": [12, 10], "num_outputs": 3, "channels": [4, 8], "hidden": 16}
    model = build_model("cnn", params, members=members).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    config = {**bundle_config(model, data), "members": members}
    onnx_bytes, info = export_checked(model, config, data)
    assert info["max_abs_diff"] <= MAX_ABS_DIFF
    assert info["inputs"][0]["shape"] == ["batch", 3, 12, 10]
    (x,), _ = data.val.__getitems__(list(range(len(data.val))))
    raw, values = session(onnx_bytes).run(None, {"images": x.numpy()})
    expected = torch_raw(model, x)
    np.testing.assert_allclose(raw, expected, atol=MAX_ABS_DIFF, rtol=0)
    np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-5)  # probabilities


def test_export_refused_when_onnx_runtime_disagrees(tmp_path, monkeypatch):
    data = smiles_data()
    model = rnn(data)
    save_bundle(tmp_path, model, bundle_config(model, data))
    monkeypatch.setattr(onnx_export, "MAX_ABS_DIFF", -1.0)  # nothing can pass
    info = export_bundle(tmp_path, data, model)
    assert "differs from PyTorch" in info["error"]
    assert not (tmp_path / ONNX_FILE).exists()
    assert read_bundle_config(tmp_path)["metrics"]["onnx"] == info


def test_export_bundle_without_data_checks_synthetic_probes(tmp_path):
    data = smiles_data()
    model = rnn(data, cell="lstm", bidirectional=True)
    save_bundle(tmp_path, model, bundle_config(model, data, metrics={"test": {"roc_auc": 0.5}}))
    info = export_bundle(tmp_path)
    assert info["checked_on"] == "synthetic"
    assert info["max_abs_diff"] <= MAX_ABS_DIFF
    config = read_bundle_config(tmp_path)
    assert config["metrics"]["onnx"] == info
    assert config["metrics"]["test"] == {"roc_auc": 0.5}
    onnx.checker.check_model(onnx.load(str(tmp_path / ONNX_FILE)))


# A program that knows nothing of MedMaaS: no site (so no editable install of the project),
# only the site-packages directory it is given; it imports onnxruntime, numpy, json and re.
CLEAN_SCORER = r"""
import json, re, sys
sys.path.append(sys.argv[1])
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
tok = json.loads(meta["medmaas.tokenizer"])
stoi = {t: i for i, t in enumerate(tok["vocab"])}
pattern = re.compile(tok["pattern"])
rows = [[stoi.get(t, tok["unk_id"]) for t in pattern.findall(s)] for s in json.loads(sys.argv[3])]
lengths = np.array([len(r) for r in rows], dtype=np.int64)
ids = np.full((len(rows), int(lengths.max())), tok["pad_id"], dtype=np.int64)
for i, r in enumerate(rows):
    ids[i, : len(r)] = r
values = session.run(["values"], {"ids": ids, "lengths": lengths})[0]
names = json.loads(meta["medmaas.output_names"])
for forbidden in ("torch", "workers", "app", "medmaas"):
    assert forbidden not in sys.modules, forbidden
print(json.dumps({"columns": names, "values": values.tolist()}))
"""


def test_onnx_runtime_alone_scores_like_pytorch(tmp_path):
    data = smiles_data("regression")
    model = rnn(data, members=2, cell="lstm", bidirectional=True, num_layers=2)
    save_bundle(tmp_path / "bundle", model, bundle_config(model, data))
    assert "error" not in export_bundle(tmp_path / "bundle", data, model)
    predictor = Predictor.from_bundle(tmp_path / "bundle", "cpu", backend="torch")
    smiles = SMILES[:12]
    expected, errors = predictor.score_smiles(smiles, canonical=True)
    assert not any(errors)
    script = tmp_path / "score.py"
    script.write_text(CLEAN_SCORER)
    site = sysconfig.get_paths()["purelib"]
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(script), site, str(tmp_path / "bundle" / ONNX_FILE), json.dumps(smiles)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["columns"] == predictor.output_names
    np.testing.assert_allclose(np.asarray(got["values"]), expected, atol=MAX_ABS_DIFF, rtol=0)


def test_predictor_onnx_backend_scores_like_torch(tmp_path):
    data = smiles_data()
    model = rnn(data, members=2, cell="gru", bidirectional=True)
    save_bundle(tmp_path, model, bundle_config(model, data))
    export_bundle(tmp_path, data, model)
    by_torch = Predictor.from_bundle(tmp_path, "cpu", backend="torch")
    by_onnx = Predictor.from_bundle(tmp_path, "cpu", backend="onnx")
    assert by_torch.backend == "torch"
    assert by_onnx.backend == "onnx"
    smiles = [*SMILES[:12], "not a smiles"]
    s_torch, e_torch, x_torch = by_torch.score_smiles_full(smiles)
    s_onnx, e_onnx, x_onnx = by_onnx.score_smiles_full(smiles)
    assert e_torch == e_onnx
    assert e_onnx[-1]
    np.testing.assert_allclose(s_onnx, s_torch, atol=MAX_ABS_DIFF, rtol=0, equal_nan=True)
    assert set(x_onnx) == set(x_torch)
    for name in x_torch:
        np.testing.assert_allclose(x_onnx[name], x_torch[name], atol=MAX_ABS_DIFF, rtol=0, equal_nan=True)
    # MC dropout needs the PyTorch module: the ONNX predictor still answers it
    out = by_onnx.predict_smiles(["CCO"], uncertainty="mc_dropout", mc_samples=4)
    assert out[0]["uncertainty"]["method"] == "mc_dropout"


def test_predictor_backend_choice(tmp_path):
    data = smiles_data()
    model = rnn(data)
    save_bundle(tmp_path, model, bundle_config(model, data))
    # no model.onnx yet (a version registered before exports): PyTorch, even when onnx is asked
    assert Predictor.from_bundle(tmp_path, "cpu").backend == "torch"
    assert Predictor.from_bundle(tmp_path, "cpu", backend="onnx").backend == "torch"
    export_bundle(tmp_path, data, model)
    assert Predictor.from_bundle(tmp_path, "cpu").backend == "onnx"  # auto: faster on CPU (bench/onnx_scoring.py)
    assert Predictor.from_bundle(tmp_path, "cpu", backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        Predictor.from_bundle(tmp_path, "cpu", backend="tensorrt")


def test_export_graph_is_valid_onnx_with_documented_inputs():
    data = smiles_data()
    model = rnn(data, cell="gru")
    proto = onnx.load_from_string(export_graph(model, bundle_config(model, data)))
    assert proto.opset_import[0].version == OPSET
    assert [i.name for i in proto.graph.input] == ["ids", "lengths"]
    assert [o.name for o in proto.graph.output] == ["raw", "values"]
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "length"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["medmaas.tokenizer"])["vocab"] == data.tokenizer.to_dict()["vocab"]
    assert Path(onnx_export.__file__).name == "onnx_export.py"


def test_multilabel_values_are_sigmoids_and_the_module_command_exports_a_bundle(tmp_path, capsys):
    df = pd.DataFrame(
        {"smiles": SMILES, "a": [i % 2 for i in range(len(SMILES))], "b": [i % 3 == 0 for i in range(len(SMILES))]}
    )
    data = load_sequence_frame(df, target_columns=["a", "b"], task="multilabel")
    model = rnn(data, cell="gru", bidirectional=True)
    save_bundle(tmp_path, model, bundle_config(model, data))
    assert onnx_export.main(["bundle", str(tmp_path)]) == 0
    assert "1 exported, 0 failed" in capsys.readouterr().out
    ids, lengths = data.tokenizer.encode_batch(SMILES[:6])
    raw, values = session((tmp_path / ONNX_FILE).read_bytes()).run(None, {"ids": ids, "lengths": lengths})
    np.testing.assert_allclose(values, 1 / (1 + np.exp(-raw[0])), atol=1e-6)
    np.testing.assert_allclose(
        raw, torch_raw(model, torch.from_numpy(ids), torch.from_numpy(lengths)), atol=MAX_ABS_DIFF, rtol=0
    )
