"""Training on several devices (workers/ml/distributed.py): DistributedDataParallel over 2 gloo
rank processes on the CPU. The ranks split each global batch of `batch_size`, so the run
follows the loss curve of one process on the same batches; rank 0 checkpoints, validates and
reports once per epoch; a killed rank fails the attempt and the next one resumes from the
checkpoint; a stop ends the ranks. Each rank builds its model and data itself
(tests/unit/ddp_inputs.py) and must build the caller's. The NCCL/cuda path is the same code
with another backend and is not run here (no GPU)."""

from __future__ import annotations

import os
import signal
from typing import Any

import psutil
import pytest
import torch

from tests.conftest import ApiClient
from tests.unit import ddp_inputs
from tests.unit.test_api_datasets_models import upload
from tests.unit.test_api_jobs import assert_error
from tests.unit.test_pretrain import csv_bytes
from workers.ml import distributed
from workers.ml.data import EpochBatchSampler, PreparedData
from workers.ml.distributed import RankFailed, RankInputs, ShardedBatchSampler, fit_on_devices
from workers.ml.training import TrainConfig, TrainingCancelled, fit, load_checkpoint

torch.set_num_threads(1)  # tiny models on a shared CI box

# The ranks follow one process on the same global batches up to float32 summation order
# (observed: < 1e-6); this is the tolerance the tests hold them to.
RTOL, ATOL = 1e-4, 1e-5
CFG = TrainConfig(epochs=4, batch_size=16, lr=1e-2, seed=3, device="cpu")


INPUTS = RankInputs("tests.unit.ddp_inputs:build")  # each rank builds the model and data so


def _data() -> PreparedData:
    return ddp_inputs.make_data()


def _model(data: PreparedData) -> torch.nn.Module:
    return ddp_inputs.make_model(data)


class Reports:
    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.progress: list[float] = []
        self.resumed: list[list[dict[str, Any]]] = []
        self.pids: set[int] = set()  # the rank processes seen running

    def on_epoch(self, epoch: int, _metrics: dict[str, Any]) -> None:
        self.epochs.append(epoch)
        self.pids |= distributed._live_ranks

    def on_progress(self, fraction: float, _message: str, _eta: float | None) -> None:
        self.progress.append(fraction)

    def on_resume(self, history: list[dict[str, Any]]) -> None:
        self.resumed.append(history)


def _gone(pids: set[int]) -> bool:
    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return len(pids) == 2 and not any(running(pid) for pid in pids) and not distributed._live_ranks


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return _data()


@pytest.fixture(scope="module")
def two_ranks(data: PreparedData) -> tuple[dict, dict, Reports]:
    model, reports = _model(data), Reports()
    out = fit_on_devices(model, data, CFG, 2, inputs=INPUTS, on_epoch=reports.on_epoch, on_progress=reports.on_progress)
    return out, model.state_dict(), reports


def _close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)


def test_ranks_split_each_global_batch_like_a_distributed_sampler() -> None:
    one = list(EpochBatchSampler(37, 8, shuffle=True, seed=5))
    ranks = [ShardedBatchSampler(37, 8, rank=r, world=3, shuffle=True, seed=5) for r in range(3)]
    for s in [*ranks]:
        s.set_epoch(0)
    shares = [list(s) for s in ranks]
    for i, batch in enumerate(one):
        got = [x for share in shares for x in share[i]]
        assert sorted(set(got)) == sorted(batch)  # the same global batch, split
        assert len({len(share[i]) for share in shares}) == 1  # as many examples per rank
        assert len(got) == -(-len(batch) // 3) * 3  # padded by repetition only up to a multiple of 3


def test_two_gloo_ranks_follow_one_process_and_report_once_per_epoch(data, two_ranks) -> None:
    out2, weights2, reports = two_ranks
    model1 = _model(data)
    out1 = fit(model1, data, CFG)
    assert [h["epoch"] for h in out2["history"]] == [1, 2, 3, 4]
    for h1, h2 in zip(out1["history"], out2["history"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=RTOL)
        assert h2["val_loss"] == pytest.approx(h1["val_loss"], rel=RTOL)  # validated once, by rank 0
    assert out2["test"]["rmse"] == pytest.approx(out1["test"]["rmse"], rel=RTOL)
    assert out2["history"][-1]["train_loss"] < 0.5 * out2["history"][0]["train_loss"]  # it learns
    _close_weights(model1.state_dict(), weights2)
    assert reports.epochs == [1, 2, 3, 4]  # once per epoch, not once per rank
    assert reports.progress
    assert max(reports.progress) <= 1.0
    assert out2["devices"] == 2
    assert out2["device"] == "cpu"
    assert _gone(reports.pids)


def test_a_killed_rank_fails_the_attempt_and_the_next_resumes_to_the_same_weights(data, two_ranks, tmp_path) -> None:
    _, weights2, _ = two_ranks
    checkpoint = tmp_path / "checkpoint.pt"
    first = Reports()

    def kill_a_rank(epoch: int, metrics: dict[str, Any]) -> None:
        first.on_epoch(epoch, metrics)
        if epoch == 1:
            os.kill(max(first.pids), signal.SIGKILL)

    with pytest.raises(RankFailed, match="killed by signal 9"):
        fit_on_devices(
            _model(data), data, CFG, 2, inputs=INPUTS, checkpoint_path=checkpoint, on_epoch=kill_a_rank,
            poll_s=0.01,  # the ranks' reports read within 10 ms: tiny epochs must not all end first
        )
    assert _gone(first.pids)
    reached = load_checkpoint(checkpoint)["epoch"]
    assert 1 <= reached < CFG.epochs
    assert len(load_checkpoint(checkpoint)["rng"]["ranks"]) == 2  # each rank's RNG state

    second = Reports()
    model = _model(data)
    out = fit_on_devices(
        model,
        data,
        CFG,
        2,
        inputs=INPUTS,
        checkpoint_path=checkpoint,
        on_epoch=second.on_epoch,
        on_resume=second.on_resume,
    )
    assert [len(h) for h in second.resumed] == [reached]  # both ranks resumed; reported once
    assert second.epochs == list(range(reached + 1, CFG.epochs + 1))
    assert out["epochs_trained"] == CFG.epochs
    _close_weights(weights2, model.state_dict())  # as if never interrupted


def test_a_stop_ends_the_ranks_and_keeps_the_checkpoint(data, tmp_path) -> None:
    checkpoint, stop, reports = tmp_path / "checkpoint.pt", [False], Reports()

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        reports.on_epoch(epoch, metrics)
        stop[0] = True  # as a cancel or a lost lease turns ctx.should_stop() True

    with pytest.raises(TrainingCancelled):
        fit_on_devices(
            _model(data),
            data,
            CFG,
            2,
            inputs=INPUTS,
            checkpoint_path=checkpoint,
            on_epoch=on_epoch,
            should_stop=lambda: stop[0],
            poll_s=0.01,
        )
    assert _gone(reports.pids)
    assert 1 <= load_checkpoint(checkpoint)["epoch"] < CFG.epochs


def test_ranks_that_build_other_inputs_fail_before_training_and_say_why(data) -> None:
    other = RankInputs("tests.unit.ddp_inputs:build", {"rows": 150, "hidden_size": 32})
    with pytest.raises(RankFailed, match=r"rank \d of 2 failed: RuntimeError: .*built other splits and state.*\(File "):
        fit_on_devices(_model(data), data, CFG, 2, inputs=other)
    assert not distributed._live_ranks


def test_rank_inputs_are_json_and_an_importable_name() -> None:
    with pytest.raises(ValueError, match="builder"):
        RankInputs("os.system('x'):f")
    with pytest.raises(TypeError):
        RankInputs("tests.unit.ddp_inputs:build", {"data": object()})


def test_devices_are_checked_at_submit(api: ApiClient) -> None:
    r = upload(api, "sequences", "mols.csv", csv_bytes(), label_columns="y")
    assert r.status_code == 201, r.get_json()
    base = {
        "model_name": "ddp",
        "dataset_id": r.get_json()["id"],
        "arch": "rnn",
        "task": "regression",
        "target": "y",
        "batch_size": 16,
    }
    for extra, says in (
        ({"devices": 9}, "8"),
        ({"devices": 0}, "1"),
        ({"devices": 2, "ensemble": 2}, "ensemble"),
        ({"devices": 3}, "multiple of devices"),
    ):
        err = assert_error(api.post("/api/v1/jobs", json={"kind": "train", "spec": {**base, **extra}}), 422)
        assert "devices" in err["details"]["spec"], err
        assert says in " ".join(err["details"]["spec"]["devices"]), err


def test_rank_devices_refuses_more_cpus_than_the_worker_has() -> None:
    with pytest.raises(ValueError, match="devices"):
        distributed.rank_devices("cpu", min((os.cpu_count() or 1) + 1, 9))
    assert distributed.rank_devices("cpu", 1) == [torch.device("cpu")]


def test_a_train_job_on_two_devices_reports_one_metric_per_epoch(app, api: ApiClient) -> None:
    from workers.tasks import execute_job

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    r = upload(api, "sequences", "mols.csv", csv_bytes(), label_columns="y")
    assert r.status_code == 201, r.get_json()
    spec = {
        "model_name": "ddp",
        "dataset_id": r.get_json()["id"],
        "arch": "rnn",
        "task": "regression",
        "target": "y",
        "epochs": 2,
        "batch_size": 16,
        "lr": 3e-3,
        "seed": 4,
        "devices": 2,
        "device": "cpu",
        "explain_faithfulness": False,
        "model": {"cell": "gru", "embedding_dim": 8, "hidden_size": 16, "dropout": 0.1},
    }
    job = api.submit("train", spec)
    outcome = execute_job(db, settings, None, job["id"])
    done = api.job(job["id"])
    assert outcome == "succeeded", done.get("error")  # a rank's failure names the rank, its error and where
    assert done["result"]["devices"] == 2
    assert done["result"]["epochs_trained"] == 2
    assert done["result"]["version"] == 1
    assert done["progress"] == 1.0
    metrics = [e["data"] for e in api.events(job["id"]) if e["type"] == "metric"]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["train_loss"] > 0 and m["val_loss"] is not None for m in metrics)
    assert not distributed._live_ranks
