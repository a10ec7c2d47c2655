"""Online predictions (issue 13): dynamic batching in the inference worker and the
request/reply protocol over Redis (app/inference.py, workers/inference/), on fakeredis and
SQLite with a tiny real model."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import func, select

from app import inference as online
from app.models import AuditEvent, Job
from app.stores import jobs as jobs_store
from tests.conftest import ApiClient, create_tenant_key, seed_tiny_model_and_library, usage_quantities
from workers.inference.batcher import Call, plan_batches, run_batch, split_results
from workers.inference.records import Answered, Recorder
from workers.inference.server import InferenceServer
from workers.inference.source import CallSource

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "CCCl", "OCC(O)CO", "CC(C)O", "C1CCCCC1", "CCOC(=O)C", "c1ccncc1"]


def call(mv: int, inputs: list[Any], call_id: str = "c", **options: Any) -> Call:
    spec = {"model_version_id": mv, "model_name": "tiny", "version": 1, "inputs": inputs, **options}
    return Call(call_id, 1, spec, "file:///x", time.time(), time.time() + 30, None)


# -- pure batching --------------------------------------------------------------------------


def test_plan_batches_groups_per_model_and_options_and_caps_the_inputs() -> None:
    calls = [
        call(1, ["C"] * 3, "a"),
        call(2, ["C"], "b"),
        call(1, ["C"] * 3, "c"),
        call(1, ["C"], "d", coverage=0.8),
        call(1, ["C"] * 3, "e"),
        call(1, ["C"] * 9, "big"),
    ]
    batches = [[c.id for c in b] for b in plan_batches(calls, max_batch=6)]
    assert batches == [["a", "c"], ["e"], ["big"], ["b"], ["d"]]


def test_split_results_gives_each_call_its_own_items_with_its_own_input_numbers() -> None:
    calls = [call(1, ["a", "b"], "x"), call(1, ["c", "d", "e"], "y")]
    items = [
        {"value": 1},
        {"value": 2},
        {"error": "input 2 has 300 tokens; model tiny v1 reads at most 256"},
        {"value": 4},
        {"error": "unreadable image: bad"},
    ]
    first, second = split_results(calls, items)
    assert first == [{"value": 1}, {"value": 2}]
    assert second[0]["error"] == "input 0 has 300 tokens; model tiny v1 reads at most 256"
    assert second[2] == {"error": "unreadable image: bad"}


# -- a real model ----------------------------------------------------------------------------


@pytest.fixture
def tiny(app) -> dict[str, Any]:
    tenant_id, key = create_tenant_key(app)
    database = app.extensions["medmaas.db"]
    settings = app.extensions["medmaas.settings"]
    seed_tiny_model_and_library(database, settings.artifacts, tenant_id, SMILES * 5)
    with database.session() as s:
        _kind, spec, queue = jobs_store.validate(s, settings, tenant_id, "predict", {"model": "tiny", "inputs": ["C"]})
    return {
        "tenant_id": tenant_id,
        "key": key,
        "db": database,
        "settings": settings,
        "mv": spec["model_version_id"],
        "queue": queue,
    }


def test_one_predictor_call_per_batch_answers_as_separate_calls_would(tiny) -> None:
    from workers.ml.predict import Predictor
    from workers.model_cache import get_predictor

    settings = tiny["settings"]
    bundle = settings.artifacts / f"tenant-{tiny['tenant_id']}" / "models" / "tiny"
    predictor = get_predictor(bundle, 2)
    alone = [predictor.predict(x, label="tiny v1") for x in (["CCO", "nope("], ["c1ccccc1"], ["CCN", "CCCl"])]
    calls = [
        call(tiny["mv"], ["CCO", "nope("], "a"),
        call(tiny["mv"], ["c1ccccc1"], "b"),
        call(tiny["mv"], ["CCN", "CCCl"], "c"),
    ]
    seen: list[int] = []
    original = Predictor.predict

    def counted(self: Predictor, inputs: Any, *args: Any, **kw: Any) -> Any:
        seen.append(len(inputs))
        return original(self, inputs, *args, **kw)

    Predictor.predict = counted  # type: ignore[method-assign]
    try:
        results = run_batch(predictor, calls)
    finally:
        Predictor.predict = original  # type: ignore[method-assign]
    assert seen == [5]  # one forward for the five inputs of three calls
    for got, want in zip(results, alone, strict=True):
        assert got["model"] == "tiny"
        assert got["outputs"] == predictor.output_names
        assert [p.get("error") for p in got["predictions"]] == [p.get("error") for p in want]
        for g, w in zip(got["predictions"], want, strict=True):
            if "value" in w:
                assert g["value"] == pytest.approx(w["value"], abs=1e-5)


def message(tiny: dict[str, Any], inputs: list[str], timeout: float = 10.0) -> dict[str, Any]:
    with tiny["db"].session() as s:
        _kind, spec, _queue = jobs_store.validate(
            s, tiny["settings"], tiny["tenant_id"], "predict", {"model": "tiny", "inputs": inputs}
        )
        from app.models import ModelVersion

        uri = s.get(ModelVersion, spec["model_version_id"]).artifact_uri
    return online.message(spec, tiny["tenant_id"], uri, time.time() + timeout, None)


def test_concurrent_calls_are_answered_in_fewer_batches_and_recorded(tiny) -> None:
    settings = tiny["settings"].replace(inference_batch_window_ms=50.0)
    server = InferenceServer(settings, tiny["db"], "test-consumer")
    server.start(warm=False)
    client = online.InferenceClient(settings)
    replies: list[online.Reply | None] = [None] * 8
    try:
        assert client.available(tiny["queue"])
        client.call(tiny["queue"], message(tiny, ["CCO"]), 5.0)  # load the model first
        before = server.batches

        def one(i: int) -> None:
            replies[i] = client.call(tiny["queue"], message(tiny, [SMILES[i], "C"]), 5.0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = server.batches - before
    finally:
        server.stop()
    for i, reply in enumerate(replies):
        assert reply is not None
        assert reply.error is None, reply
        assert reply.result is not None
        assert [p["input"] for p in reply.result["predictions"]] == [SMILES[i], "C"]
    assert batches < 8, batches
    usage = usage_quantities(tiny["db"], tiny["tenant_id"])
    assert usage[("predict_calls", "tiny", 1)] == 9
    assert usage[("predict_inputs", "tiny", 1)] == 17
    with tiny["db"].session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0  # no job for an online call


def test_a_call_nobody_takes_is_given_up_and_later_dropped_unanswered(tiny) -> None:
    client = online.InferenceClient(tiny["settings"])
    msg = message(tiny, ["CCO"])
    t0 = time.monotonic()
    assert client.call(tiny["queue"], msg, wait_s=0.3) is None
    assert time.monotonic() - t0 < 5.0  # its own 0.3 s wait, not the message's 10 s deadline
    source = CallSource(client.redis, tiny["queue"], "late", 0.0, 256)
    assert source.next_calls(0.1) == []  # the consumer that comes late does not run it


def test_a_call_whose_consumer_died_is_given_up_before_its_deadline(tiny) -> None:
    client = online.InferenceClient(tiny["settings"])
    source = CallSource(client.redis, tiny["queue"], "doomed", 0.0, 256)
    taken: list[Call] = []
    threading.Thread(target=lambda: taken.extend(source.next_calls(2.0))).start()
    msg = message(tiny, ["CCO"], timeout=20.0)
    t0 = time.monotonic()
    # the consumer takes the call and never answers; its liveness key was never set (killed)
    assert client.call(tiny["queue"], msg, wait_s=10.0) is None
    assert time.monotonic() - t0 < 6.0  # well before its 10 s wait
    assert [c.id for c in taken] == [msg["id"]]
    assert source.answer(taken, [{"ok": True, "result": {}}]) == []  # too late: not answered, not recorded


def test_records_are_written_in_one_flush_and_shown_in_metrics(tiny, app) -> None:
    client = online.InferenceClient(tiny["settings"])
    recorder = Recorder(tiny["db"], client.redis)
    entry = {
        "tenant_id": tiny["tenant_id"],
        "actor": {"kind": "key", "via": "api", "key_id": None, "key_prefix": None},
        "action": "model.predict",
        "object_type": "model",
        "object_id": "tiny@1",
        "details": {"inputs": 2},
        "client_addr": "127.0.0.1",
        "request_id": "r1",
    }
    recorder.add(
        [
            Answered(tiny["tenant_id"], "tiny", 1, tiny["mv"], 2, 0.004, audit=entry),
            Answered(tiny["tenant_id"], "tiny", 1, tiny["mv"], 3, 0.2, audit=dict(entry, request_id="r2")),
        ]
    )
    assert recorder.flush() == 2
    usage = usage_quantities(tiny["db"], tiny["tenant_id"])
    assert usage[("predict_calls", "tiny", 1)] == 2
    assert usage[("predict_inputs", "tiny", 1)] == 5
    with tiny["db"].session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == "model.predict")).all()
        assert sorted(r.request_id for r in rows) == ["r1", "r2"]
        assert {r.status for r in rows} == {200}
    registry = CollectorRegistry()
    registry.register(online.LatencyCollector(client.redis, tiny["db"]))
    text = generate_latest(registry).decode()
    assert 'medmaas_predict_latency_seconds_bucket{le="0.005",model="tiny@1"} 1.0' in text
    assert 'medmaas_predict_latency_seconds_count{model="tiny@1"} 2.0' in text
    metrics = app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert 'medmaas_predict_latency_seconds_count{model="tiny@1"} 2.0' in metrics.get_data(as_text=True)


def test_the_route_answers_online_without_a_job_and_audits_off_the_request_path(tiny, app) -> None:
    server = InferenceServer(tiny["settings"], tiny["db"], "route-consumer")
    server.start(warm=False)
    api = ApiClient(app.test_client(), tiny["key"])
    try:
        r = api.post("/api/v1/models/tiny/predict", json={"inputs": ["CCO", "nope("]})
        assert r.status_code == 200, r.get_json()
        body = r.get_json()
        assert "job_id" not in body
        assert body["model"] == "tiny"
        assert body["version"] == 1
        assert "value" in body["predictions"][0]
        assert body["predictions"][1]["error"]
        over = api.post("/api/v1/models/tiny/predict", json={"inputs": ["C"] * 1001, "timeout": 0.2})
        assert over.status_code in (200, 202)
        assert over.get_json().get("job_id") or over.get_json().get("id")
        assert api.post("/api/v1/models/nothere/predict", json={"inputs": ["C"]}).status_code == 404
    finally:
        server.stop()  # flushes the records
    with tiny["db"].session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == "model.predict")).all()
    statuses = sorted(r.status or 0 for r in rows)
    assert len(rows) == 3, statuses
    assert 200 in statuses, statuses
    assert 404 in statuses, statuses
