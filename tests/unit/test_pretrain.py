"""The `pretrain` kind (a SMILES language model, workers/ml/lm.py) and `init_from`: the spec
checks, the model's data layout, training and resuming, the bundle, and a fine-tune that
starts from the pretrained embedding, recurrent weights and vocabulary."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from app.kinds import SubmitContext
from app.kinds.train import TrainSpec, check
from app.models import ModelVersion
from tests.conftest import ApiClient
from tests.unit.test_api_datasets_models import upload
from tests.unit.test_api_jobs import assert_error
from tests.unit.test_augment import MOLECULES, frame
from workers.ml import lm
from workers.ml.training import TrainConfig

LM_MODEL = {"cell": "gru", "embedding_dim": 8, "hidden_size": 16, "num_layers": 1, "dropout": 0.0}


def csv_bytes() -> bytes:
    return frame().to_csv(index=False).encode()


@pytest.fixture()
def mols(api: ApiClient) -> dict:
    r = upload(api, "sequences", "mols.csv", csv_bytes(), label_columns="y")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def tiny_lm(tmp_path, epochs: int = 2, checkpoint=None):  # noqa: ANN001, ANN201
    tok = lm.fit_vocabulary(MOLECULES, seed=0, max_len=32)
    train, val = lm.LMSequences(MOLECULES[4:], tok, 32), lm.LMSequences(MOLECULES[:4], tok, 32)
    model = lm.SmilesLM(lm.lm_config({"vocab_size": tok.vocab_size, **LM_MODEL}))
    out = lm.fit_lm(model, train, val, TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, seed=0, device="cpu"),
                    checkpoint_path=checkpoint)
    return model, tok, out


def test_each_molecule_reads_eos_tokens_and_predicts_tokens_eos() -> None:
    tok = lm.fit_vocabulary(["CCO", "c1ccccc1"], seed=0, max_len=16)
    eos = tok.vocab.stoi[lm.EOS]
    ds = lm.LMSequences(["CCO", "c1ccccc1"], tok, 16)
    (ids, lengths), targets = ds.__getitems__([0, 1])
    assert lengths.tolist() == [4, 9]
    assert ids[0, :4].tolist() == [eos, *tok.encode("CCO")] and ids[0, 4:].eq(0).all()
    assert targets[0, :4].tolist() == [*tok.encode("CCO"), eos] and targets[0, 4:].eq(0).all()
    assert lm.too_long(["CCO", "c1ccccc1"], tok, 4).tolist() == [False, True]


def test_the_language_model_learns_resumes_and_round_trips(tmp_path) -> None:  # noqa: ANN001
    ckpt = tmp_path / "ckpt.pt"
    _, _, first = tiny_lm(tmp_path, epochs=1, checkpoint=ckpt)
    model, tok, out = tiny_lm(tmp_path, epochs=3, checkpoint=ckpt)  # continues at epoch 2
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3] and out["epochs_trained"] == 3
    assert out["history"][-1]["train_loss"] < first["history"][0]["train_loss"]
    assert 1.0 < out["val"]["perplexity"] < tok.vocab_size
    lm.save_lm_bundle(tmp_path / "bundle", model, tok, metrics={"val_perplexity": out["val"]["perplexity"]})
    loaded, loaded_tok, config = lm.load_lm_bundle(tmp_path / "bundle")
    assert config["arch"] == lm.LM_ARCH and config["task"] == {"type": "language_model"}
    assert loaded_tok.vocab.itos == tok.vocab.itos and lm.EOS in loaded_tok.vocab
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_a_fine_tune_starts_from_the_pretrained_weights_and_vocabulary(tmp_path) -> None:  # noqa: ANN001
    from workers.kinds.train import build_member, pretrained_tokenizer
    from workers.ml.data import load_sequence_frame

    model, tok, _ = tiny_lm(tmp_path, epochs=1)
    lm.save_lm_bundle(tmp_path / "lm", model, tok)
    vocabulary = pretrained_tokenizer(tmp_path / "lm")
    data = load_sequence_frame(frame(), text_column="smiles", target_columns="y", task="regression", seed=1,
                               max_len=64, vocabulary=vocabulary, augment=1)
    assert data.tokenizer.vocab.itos == tok.vocab.itos and data.tokenizer.max_len == 64
    spec = {"arch": "rnn", "model": {k: v for k, v in LM_MODEL.items()}}
    fine = build_member(spec, data, seed=5, pretrained=tmp_path / "lm")
    pretrained = model.state_dict()
    copied = [k for k in fine.state_dict() if k.startswith(("embedding.", "rnn."))]
    assert copied and all(torch.equal(fine.state_dict()[k], pretrained[k]) for k in copied)
    assert fine.head.out_features == 1  # the task head starts fresh
    wrong = build_member({"arch": "rnn", "model": {**LM_MODEL, "hidden_size": 12}}, data, seed=5, pretrained=None)
    with pytest.raises(ValueError, match="do not fit"):
        lm.load_encoder(wrong, tmp_path / "lm")


def _version(app, tenant_id: int, name: str, task: str, model: dict) -> None:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        s.add(ModelVersion(tenant_id=tenant_id, name=name, version=1, arch="rnn", task=task, input_kind="smiles",
                           spec={"model": model}, dataset_id=None, dataset_sha256="x", metrics={},
                           artifact_uri="file:///nowhere", job_id=None))


def test_spec_checks_name_the_field(app, api: ApiClient, mols: dict) -> None:  # noqa: ANN001
    base = {"model_name": "ft", "dataset_id": mols["id"], "arch": "rnn", "task": "regression", "target": "y",
            "epochs": 1}

    def train(**kw):  # noqa: ANN003, ANN202
        return api.post("/api/v1/jobs", json={"kind": "train", "spec": {**base, **kw}})

    err = assert_error(train(init_from="nope@1"), 422, "unknown_model")
    assert "init_from" in err["details"]["spec"]
    tenant_id = _tenant_of(app, mols)
    _version(app, tenant_id, "clf", "regression", {})
    _version(app, tenant_id, "chem-lm", "language_model", LM_MODEL)
    err = assert_error(train(init_from="clf@1"), 422)
    assert "not a language model" in err["details"]["spec"]["init_from"][0]
    err = assert_error(train(init_from="chem-lm@1", model={"hidden_size": 32}), 422)
    assert "init_from" in err["details"]["spec"] and "hidden_size" in err["details"]["spec"]["model"]
    err = assert_error(train(init_from="chem-lm@1", model={"bidirectional": True}), 422)
    assert "bidirectional" in err["details"]["spec"]["model"]
    err = assert_error(train(arch="cnn", init_from="chem-lm@1", task="classification", target=None), 422)
    assert "init_from" in err["details"]["spec"]
    job = api.submit("train", {**base, "init_from": "chem-lm@1"})  # the shape is filled in from the LM
    assert job["spec"]["model"] == {k: LM_MODEL[k] for k in ("cell", "embedding_dim", "hidden_size", "num_layers")}
    assert job["spec"]["init_from_version"] == "chem-lm@1"
    # pretrain: SMILES from a library or sequences; a bad model parameter is named
    err = assert_error(api.post("/api/v1/jobs", json={"kind": "pretrain", "spec": {
        "model_name": "lm", "dataset_id": mols["id"], "model": {"bidirectional": True}}}), 422)
    assert "bidirectional" in err["details"]["spec"]["model"]
    job = api.submit("pretrain", {"model_name": "lm", "dataset_id": mols["id"], "max_rows": 40})
    assert job["spec"]["model"]["cell"] == "gru" and job["spec"]["max_rows"] == 40


def _tenant_of(app, ds: dict) -> int:  # noqa: ANN001
    from app.models import Dataset

    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(Dataset.tenant_id).where(Dataset.id == ds["id"]))


def test_ensemble_cap_augment_and_budget_are_checked_at_submit(app, api: ApiClient, mols: dict) -> None:  # noqa: ANN001
    settings = app.extensions["medmaas.settings"]
    spec = TrainSpec().load({"model_name": "m", "dataset_id": mols["id"], "arch": "rnn", "task": "regression",
                             "target": "y", "epochs": 10, "ensemble": 4, "augment": {"random_smiles": 4}})
    with app.extensions["medmaas.db"].session() as s:
        ctx = SubmitContext(s, _tenant_of(app, mols), settings.replace(max_ensemble=3))
        with pytest.raises(Exception) as err:
            check(spec, ctx)
        assert err.value.details["spec"].keys() == {"ensemble"}
        # 48 molecules: 38 train rows x 10 epochs x 4 members x (1 + 4 random SMILES)
        ctx = SubmitContext(s, _tenant_of(app, mols), settings.replace(max_epoch_rows=10 * 38 * 4 * 5 - 1))
        with pytest.raises(Exception) as err:
            check(spec, ctx)
        assert "epochs" in err.value.details["spec"] and "4 ensemble members" in err.value.message
        ctx = SubmitContext(s, _tenant_of(app, mols), settings.replace(max_epoch_rows=10 * 38 * 4 * 5))
        assert check(spec, ctx)["ensemble"] == 4
    tokens = upload(api, "sequences", "codes.csv", b"codes,y\n" + b"".join(
        f"A{i % 5} B{i % 3},{i % 2}\n".encode() for i in range(40)), label_columns="y", tokenizer="whitespace", text_column="codes")
    assert tokens.status_code == 201, tokens.get_json()
    r = api.post("/api/v1/jobs", json={"kind": "train", "spec": {
        "model_name": "m", "dataset_id": tokens.get_json()["id"], "arch": "rnn", "augment": {"random_smiles": 2}}})
    assert "augment" in assert_error(r, 422)["details"]["spec"]
    r = api.post("/api/v1/jobs", json={"kind": "train", "spec": {
        "model_name": "m", "dataset_id": mols["id"], "arch": "rnn", "ensemble": 11}})
    assert "ensemble" in assert_error(r, 422)["details"]["spec"]


def test_a_pretrain_job_registers_a_language_model(app, api: ApiClient, mols: dict) -> None:  # noqa: ANN001
    from workers.tasks import execute_job

    job = api.submit("pretrain", {"model_name": "chem-lm", "dataset_id": mols["id"], "epochs": 2, "batch_size": 16,
                                  "model": LM_MODEL, "max_len": 48})
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    assert execute_job(db, settings, None, job["id"]) == "succeeded"
    done = api.job(job["id"])
    with db.session() as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.name == "chem-lm"))
        assert mv.task == "language_model" and mv.input_kind == "smiles"
        assert mv.metrics["val_perplexity"] == done["result"]["metrics"]["val_perplexity"] > 1
    assert [e["data"]["epoch"] for e in api.events(job["id"]) if e["type"] == "metric"] == [1, 2]
    ft = api.submit("train", {"model_name": "ft", "dataset_id": mols["id"], "arch": "rnn", "task": "regression",
                              "target": "y", "init_from": "chem-lm"})
    assert ft["spec"]["init_from_model_version_id"] == mv.id
