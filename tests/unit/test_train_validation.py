"""Issue 10: what can be checked at submit is checked at submit (422 naming the field); what
can only fail later fails with one clear sentence, the traceback for the operator only."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from sqlalchemy import select

from app import jobs, workers_registry
from app.kinds import SubmitContext
from app.modelconfig import CNNConfig, ConfigError, RNNConfig, check_params, resolve_split, too_few_rows
from app.models import Dataset, Job, JobEvent
from tests.conftest import ApiClient
from tests.unit.test_api_datasets_models import upload
from tests.unit.test_api_jobs import assert_error

SOLUBILITY_LIKE = b"smiles,solubility,active,const\n" + b"".join(
    f"{'C' * (i % 12 + 1)}O,{0.137 * i - 3.1:.3f},{i % 2},x\n".encode() for i in range(40)
)


@pytest.fixture()
def seqs(api: ApiClient) -> dict:
    r = upload(api, "sequences", "sol.csv", SOLUBILITY_LIKE, label_columns="solubility,active,const")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def train(api: ApiClient, spec: dict):  # noqa: ANN201
    return api.post("/api/v1/jobs", json={"kind": "train", "spec": spec})


def base(ds: dict, **kw) -> dict:  # noqa: ANN003
    return {"model_name": "m", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "solubility",
            **kw}


# --------------------------------------------------------------------------- 1. model hyper-parameters


def test_the_worker_builds_from_the_same_validated_config() -> None:
    from workers.ml import cnn, models, rnn

    assert rnn.RNNConfig is RNNConfig and cnn.CNNConfig is CNNConfig  # one definition, torch-free
    assert set(rnn.CELLS) == {"rnn", "gru", "lstm"}
    with pytest.raises(ConfigError) as err:
        models.build_model("rnn", {"vocab_size": 10, "cell": "lstmx", "hidden_size": -3})
    assert set(err.value.errors) == {"cell", "hidden_size"}
    # what the API checks is exactly what model_config refuses
    assert set(check_params("rnn", {"cell": "lstmx", "hidden_size": -3})) == {"cell", "hidden_size"}
    model = models.build_model("cnn", {"in_channels": 1, "image_size": [8, 8], "num_outputs": 2, "channels": [4]})
    assert model.cfg.channels == (4,) and model.cfg.image_size == (8, 8)


@pytest.mark.parametrize(
    ("arch", "params", "field"),
    [
        ("rnn", {"cell": "lstmx"}, "cell"),
        ("rnn", {"hidden_size": -3}, "hidden_size"),
        ("rnn", {"embedding_dim": 0}, "embedding_dim"),
        ("rnn", {"num_layers": 2.5}, "num_layers"),
        ("rnn", {"dropout": 1.0}, "dropout"),
        ("rnn", {"bidirectional": "yes"}, "bidirectional"),
        ("rnn", {"hidden_size": True}, "hidden_size"),
        ("cnn", {"channels": []}, "channels"),
        ("cnn", {"channels": [8, -1]}, "channels"),
        ("cnn", {"channels": "32"}, "channels"),
        ("cnn", {"kernel_size": 4}, "kernel_size"),
        ("cnn", {"kernel_size": 0}, "kernel_size"),
        ("cnn", {"hidden": 0}, "hidden"),
        ("cnn", {"pool_to": 0}, "pool_to"),
        ("cnn", {"batch_norm": 1}, "batch_norm"),
        ("cnn", {"dropout": -0.1}, "dropout"),
        ("cnn", {"in_channels": 3}, "in_channels"),  # data-derived: not a spec parameter
    ],
)
def test_bad_hyper_parameters_are_named(arch: str, params: dict, field: str) -> None:
    errors = check_params(arch, params)
    assert list(errors) == [field] and errors[field][0], errors


def test_good_hyper_parameters_pass() -> None:
    assert check_params("rnn", {"cell": "lstm", "hidden_size": 16, "num_layers": 2, "dropout": 0,
                                "bidirectional": True, "embedding_dim": 8}) == {}
    assert check_params("cnn", {"channels": [8, 16], "kernel_size": 5, "hidden": 32, "dropout": 0.5,
                                "batch_norm": False, "pool_to": 2}) == {}


def test_api_refuses_bad_model_parameters_with_field_paths(api: ApiClient, seqs: dict) -> None:
    err = assert_error(train(api, base(seqs, model={"cell": "lstmx", "hidden_size": -3})), 422, "invalid_spec")
    model = err["details"]["spec"]["model"]
    assert set(model) == {"cell", "hidden_size"}
    assert "rnn, gru, lstm" in model["cell"][0] and "-3" in model["hidden_size"][0]
    err = assert_error(train(api, base(seqs, model={"hidden_sise": 3})), 422, "invalid_spec")
    assert "unknown rnn parameter" in err["details"]["spec"]["model"]["hidden_sise"][0]


# --------------------------------------------------------------------------- 2. split


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, {"train": 0.8, "val": 0.1, "test": 0.1}),
        ({"val": 0.1, "test": 0.1}, {"train": 0.8, "val": 0.1, "test": 0.1}),
        ({"val": 0.2}, {"train": 0.7, "val": 0.2, "test": 0.1}),
        ({"val": 0, "test": 0}, {"train": 1.0, "val": 0.0, "test": 0.0}),
        ({"train": 0.7, "val": 0.2}, {"train": 0.7, "val": 0.2, "test": 0.1}),
        ({"train": 0.6}, {"train": 0.6, "val": 0.2, "test": 0.2}),
        ({"train": 0.5, "val": 0.25, "test": 0.25}, {"train": 0.5, "val": 0.25, "test": 0.25}),
    ],
)
def test_split_fractions_default_to_the_rest(given: dict | None, expected: dict) -> None:
    assert resolve_split(given) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"train": 0.5, "val": 0.1, "test": 0.1}, "train"),  # sums to 0.7
        ({"val": 1.0}, "val"),
        ({"test": -0.1}, "test"),
        ({"val": 0.6, "test": 0.5}, "train"),  # nothing left
        ({"train": 0.9, "val": 0.3}, "train"),
    ],
)
def test_bad_split_fractions_name_the_field(given: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_split(given)
    assert field in err.value.errors, err.value.errors


def test_api_completes_the_split_and_refuses_bad_ones(api: ApiClient, app, seqs: dict) -> None:  # noqa: ANN001
    job = api.submit("train", base(seqs, split={"val": 0.1, "test": 0.1}))
    with app.extensions["medmaas.db"].session() as s:
        split = s.get(Job, job["id"]).spec["split"]
    assert split.pop("method") == "random" and split == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1})
    err = assert_error(train(api, base(seqs, split={"train": 0.5, "val": 0.1, "test": 0.1})), 422, "invalid_spec")
    assert "sum to 1" in err["details"]["spec"]["split"]["train"][0]


# --------------------------------------------------------------------------- 3. device cuda needs a GPU worker


def test_cuda_without_a_gpu_worker_is_422_naming_device(api: ApiClient, seqs: dict, fake_redis) -> None:  # noqa: ANN001
    err = assert_error(train(api, base(seqs, device="cuda")), 422, "invalid_spec")
    assert "no GPU worker is connected" in err["details"]["spec"]["device"][0]
    assert "medmaas worker --queues gpu --gpu 0" in err["message"]
    # a worker on the cpu queue does not help
    workers_registry.announce(fake_redis.client(), ["cpu"], "host:1")
    assert_error(train(api, base(seqs, device="cuda:0")), 422, "invalid_spec")
    workers_registry.announce(fake_redis.client(), ["gpu"], "host:2:gpu0")
    job = api.submit("train", base(seqs, device="cuda:0"))
    assert job["queue"] == "gpu"
    assert api.submit("train", base(seqs, device="cpu"))["queue"] == "cpu"


def test_cuda_is_accepted_with_a_note_when_the_broker_is_down(api: ApiClient, app, seqs: dict, fake_redis) -> None:  # noqa: ANN001
    fake_redis.down()
    r = train(api, base(seqs, device="cuda"))
    fake_redis.up()
    assert r.status_code == 202, r.get_json()
    with app.extensions["medmaas.db"].session() as s:
        spec = s.get(Job, r.get_json()["id"]).spec
    assert "not checked" in spec["notes"][0]


def test_score_device_cuda_uses_the_same_check(app, fake_redis) -> None:  # noqa: ANN001
    from app.kinds import SpecError

    settings = app.extensions["medmaas.settings"]
    with app.extensions["medmaas.db"].session() as s:
        ctx = SubmitContext(s, 1, settings, lambda: workers_registry.live_queues(fake_redis.client()))
        with pytest.raises(SpecError) as err:
            workers_registry.gpu_worker_check({"device": "cuda", "queue": None}, ctx)
        assert "device" in err.value.details["spec"]
        assert workers_registry.gpu_worker_check({"device": "auto"}, ctx) is None
        workers_registry.announce(fake_redis.client(), ["gpu"], "h:1")
        assert workers_registry.gpu_worker_check({"device": "cuda:0"}, ctx) is None
        # nobody to ask (a script without a broker): not checked
        assert workers_registry.gpu_worker_check({"device": "cuda"}, SubmitContext(s, 1, settings)) is None


def test_presence_keys_expire_and_are_withdrawn(fake_redis) -> None:  # noqa: ANN001
    from workers.tasks import Presence

    client = fake_redis.client()
    presence = Presence(fake_redis.url, ["cpu", "gpu"], "host:7", interval_s=0.2)
    presence.start()
    try:
        assert workers_registry.live_workers(client) == {"cpu": {"host:7"}, "gpu": {"host:7"}}
        ttl = client.pttl(workers_registry.presence_key("gpu", "host:7"))
        assert 0 < ttl <= 600
        time.sleep(0.5)  # refreshed by the thread, so still there after its first TTL
        assert workers_registry.live_queues(client) == {"cpu", "gpu"}
    finally:
        presence.stop()
    assert workers_registry.live_queues(client) == set()
    workers_registry.announce(client, ["gpu"], "dead:1", ttl_s=0.05)
    time.sleep(0.15)
    assert workers_registry.live_queues(client) == set()  # a silent death drops out within the TTL


# --------------------------------------------------------------------------- 4. target and row count


def test_classification_on_a_continuous_target_is_422(api: ApiClient, seqs: dict) -> None:
    err = assert_error(train(api, base(seqs, task="classification")), 422, "invalid_labels")
    assert "target 'solubility' holds continuous values" in err["message"] and "use task regression" in err["message"]
    assert "task" in err["details"]["spec"]
    assert api.submit("train", base(seqs, task="classification", target="active"))["state"] == "queued"


def test_a_single_class_is_422(api: ApiClient, seqs: dict) -> None:
    err = assert_error(train(api, base(seqs, task="classification", target="const")), 422, "invalid_labels")
    assert "one class only" in err["message"] and "target" in err["details"]["spec"]


def test_too_few_rows_are_refused_at_submit(api: ApiClient) -> None:
    tiny = upload(api, "sequences", "tiny.csv", b"smiles,y\nCCO,1.5\nc1ccccc1,0.3\n").get_json()
    err = assert_error(train(api, base(tiny, target="y")), 422, "too_few_rows")
    assert "2 rows are too few" in err["message"] and "at least 8 training rows" in err["message"]
    assert "dataset_id" in err["details"]["spec"]
    nine = upload(api, "sequences", "nine.csv",
                  b"smiles,y\n" + b"".join(f"{'C' * (i + 1)},{i * 0.5}\n".encode() for i in range(9))).get_json()
    assert_error(train(api, base(nine, target="y")), 422, "too_few_rows")  # 7/1/1
    assert too_few_rows(10, resolve_split(None)) is None  # 8/1/1 is enough
    assert api.submit("train", base(nine, target="y", split={"val": 0, "test": 0}))["state"] == "queued"


def test_images_use_the_stored_counts(api: ApiClient) -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, train_images=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), train_labels=np.array([0, 1] * 3))
    ds = upload(api, "images", "few.npz", buf.getvalue()).get_json()
    spec = {"model_name": "m", "dataset_id": ds["id"], "arch": "cnn", "task": "classification"}
    err = assert_error(train(api, spec), 422, "too_few_rows")
    assert "6 rows are too few" in err["message"]
    err = assert_error(train(api, {**spec, "model": {"kernel_size": 2}}), 422, "invalid_spec")
    assert "odd" in err["details"]["spec"]["model"]["kernel_size"][0]


# --------------------------------------------------------------------------- 5. later failures: one sentence


def test_failure_message_is_one_sentence() -> None:
    from workers.tasks import failure_message

    assert failure_message("train", ValueError("device 'cuda' requested but CUDA is not available")) == (
        "Training failed: device 'cuda' requested but CUDA is not available."
    )
    assert failure_message("sleep", RuntimeError("boom\n  at line 3")) == "Job (sleep) failed: RuntimeError: boom at line 3."
    assert failure_message("score", KeyError()) == "Scoring failed: KeyError (see the worker log)."
    assert len(failure_message("train", ValueError("x" * 5000))) < 600


def run_failing_job(app, tenant_id: int, kind: str, spec: dict) -> Job:  # noqa: ANN001
    from workers.tasks import execute_job

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    with db.session() as s:
        job, _ = jobs.submit(s, tenant_id=tenant_id, kind=kind, spec=spec, queue="cpu")
        job_id = job.id
    assert execute_job(db, settings, None, job_id) == "failed"
    with db.session() as s:
        return s.get(Job, job_id)


def test_worker_failure_keeps_the_traceback_for_the_operator(app, api: ApiClient, seqs: dict) -> None:  # noqa: ANN001
    from app.artifacts import job_dir
    from app.kinds import get_kind
    from workers.tasks import OPERATOR_TRACEBACK

    kind = get_kind("train")
    assert kind is not None and kind.check is not None
    with app.extensions["medmaas.db"].session() as s:
        tenant_id = s.get(Dataset, seqs["id"]).tenant_id
        # A spec that passed the submit check, then fails where only the worker can tell:
        # the device it names does not exist there.
        spec = kind.check(kind.schema().load(base(seqs, epochs=1)), SubmitContext(s, tenant_id, app.extensions["medmaas.settings"]))
    spec["device"] = "cuda:99"
    job = run_failing_job(app, tenant_id, "train", spec)
    assert job.error.startswith("Training failed: ") and "\n" not in job.error and "Traceback" not in job.error
    assert len(job.error) < 600
    log = job_dir(app.extensions["medmaas.settings"], tenant_id, job.id) / OPERATOR_TRACEBACK
    assert "Traceback (most recent call last)" in log.read_text()
    with app.extensions["medmaas.db"].session() as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
    assert events and not any("Traceback" in str(e.data) for e in events)
    body = api.get(f"/api/v1/jobs/{job.id}").get_json()
    assert body["error"] == job.error and "Traceback" not in str(body)

    sleep = run_failing_job(app, tenant_id, "sleep", {"seconds": 0, "steps": 1, "fail": True, "metrics": False,
                                                      "queue": None})
    assert sleep.error == "Job (sleep) failed: RuntimeError: sleep job asked to fail."

