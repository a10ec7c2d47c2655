"""`medmaas demo` (the README's main job) against a live server with real workers."""
from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from medmaas.demo import DEMO_MOLECULES, DemoError, run_demo
from tests.conftest import create_tenant_key
from tests.e2e.live_server import LiveServer

pytestmark = pytest.mark.integration


def test_demo_uploads_trains_and_predicts(pg_app, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker("cpu,gpu")
    procs.worker("inference")
    server = LiveServer(pg_app).start()
    try:
        out = io.StringIO()
        summary = run_demo(server.url, create_tenant_key(pg_app)[1], epochs=4,
                           console=Console(file=out, width=120, force_terminal=False))
        with pytest.raises(DemoError, match="Invalid API key"):
            run_demo(server.url, "mm_0123456789ab_not-a-key", epochs=1, console=Console(file=io.StringIO()))
    finally:
        server.stop()
    text = out.getvalue()
    assert summary["dataset"]["rows"] > 1200 and summary["job"]["state"] == "succeeded", procs.logs()
    assert summary["job"]["result"]["epochs_trained"] == 4
    assert "epoch  4: train loss" in text and "test RMSE" in text
    for step in ("1. Upload", "2. Train", "3. Predict"):
        assert step in text, text
    assert "inferred: molecules in column 'smiles'" in text and "labels: 'solubility' (float)" in text
    assert re.search(r"\d+ train / \d+ val / \d+ test rows", text), text  # the split the training log reported
    preds = summary["predictions"]["predictions"]
    assert len(preds) == len(DEMO_MOLECULES)
    assert "error" in preds[-1] and all("value" in p for p in preds[:-1])
    # The invalid molecule's whole error is in the table (wrapped if long, never cut).
    assert "".join(preds[-1]["error"].split()) in "".join(text.split()).replace("│", "")
