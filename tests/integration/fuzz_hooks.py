"""Schemathesis hooks for tests/integration/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

They keep the fuzz run able to go on, without hiding any answer from the checks:
- `key_id` never names the fuzzer's own key: revoking or rotating it would turn every later
  request into a 401 (another key of the tenant, FUZZ_VICTIM_KEY_ID, takes those hits);
- before an event stream is opened, its job is cancelled (through the API): no worker runs
  in this test, and a queued job's stream stays open by design (up to 10 minutes), which is a
  slow request, not a finding. A cancelled job's stream sends its events and `end` at once.
"""
from __future__ import annotations

import os
from typing import Any

import requests
import schemathesis


def _env_int(name: str) -> int:
    return int(os.environ[name])


def _as_id(value: Any) -> int | None:
    """The id a path segment names for the server (which reads "01" as 1), or None."""
    text = str(value).strip()
    return int(text) if text.isascii() and text.isdigit() else None


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    params = case.path_parameters
    if not params:
        return
    if "key_id" in params and _as_id(params["key_id"]) == _env_int("FUZZ_OWN_KEY_ID"):
        params["key_id"] = _env_int("FUZZ_VICTIM_KEY_ID")
    job_id = _as_id(params.get("job_id", ""))
    if case.operation.path.endswith("/stream") and job_id is not None:
        requests.post(f"{os.environ['FUZZ_BASE_URL']}/api/v1/jobs/{job_id}/cancel", timeout=30,
                      headers={"Authorization": f"Bearer {os.environ['FUZZ_SECRET']}"})
