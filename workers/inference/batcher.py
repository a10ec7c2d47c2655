"""Dynamic batching: the calls popped together are grouped per model version and options,
each group cut into batches of at most max_batch inputs, and each batch run as ONE
Predictor call on the concatenated inputs whose per-input results are split back.

A call bigger than max_batch runs alone (never split: its inputs are answered together).
Per-input errors keep their meaning: an error that names the input's position in the
concatenated batch ("input 130 has 300 tokens") is renamed to its position in its own call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.ml.predict import Predictor


@dataclass(frozen=True)
class Call:
    """One online predict call as the web process sent it (app/inference.py `message`)."""

    id: str
    tenant_id: int
    spec: dict[str, Any]
    bundle: str
    enqueued: float
    deadline: float
    audit: dict[str, Any] | None

    @property
    def inputs(self) -> list[Any]:
        return list(self.spec["inputs"])

    @property
    def model_version_id(self) -> int:
        return int(self.spec["model_version_id"])

    @property
    def label(self) -> str:
        return f"{self.spec['model_name']} v{self.spec['version']}"

    @property
    def group_key(self) -> tuple[int, str]:
        """Calls with equal keys may share a forward pass: same weights, same options."""
        options = {k: v for k, v in self.spec.items() if k not in ("inputs", "queue")}
        return self.model_version_id, json.dumps(options, sort_keys=True, default=str)


def parse_call(raw: bytes | str) -> Call | None:
    """A Call from its JSON text, or None for a message that is not one (logged by the caller)."""
    try:
        body = json.loads(raw)
        return Call(
            id=str(body["id"]),
            tenant_id=int(body["tenant_id"]),
            spec=dict(body["spec"]),
            bundle=str(body["bundle"]),
            enqueued=float(body["enqueued"]),
            deadline=float(body["deadline"]),
            audit=body.get("audit"),
        )
    except (ValueError, KeyError, TypeError):
        return None


def plan_batches(calls: Sequence[Call], max_batch: int) -> list[list[Call]]:
    """Calls grouped by group_key (in order of first arrival), each group cut into batches
    of at most max_batch inputs (a call bigger than that is a batch of its own)."""
    groups: dict[tuple[int, str], list[Call]] = {}
    for call in calls:
        groups.setdefault(call.group_key, []).append(call)
    batches: list[list[Call]] = []
    for members in groups.values():
        current: list[Call] = []
        size = 0
        for call in members:
            n = len(call.spec["inputs"])
            if current and size + n > max_batch:
                batches.append(current)
                current, size = [], 0
            current.append(call)
            size += n
        if current:
            batches.append(current)
    return batches


_INPUT_INDEX = re.compile(r"^input (\d+)\b")


def split_results(calls: Sequence[Call], predictions: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The concatenated batch's per-input results, back per call (errors renumbered)."""
    out: list[list[dict[str, Any]]] = []
    start = 0
    for call in calls:
        n = len(call.spec["inputs"])
        mine = predictions[start : start + n]
        for local, item in enumerate(mine):
            error = item.get("error")
            if isinstance(error, str):
                m = _INPUT_INDEX.match(error)
                if m is not None and int(m.group(1)) == start + local:
                    item["error"] = f"input {local}{error[m.end() :]}"
        out.append(mine)
        start += n
    return out


def run_batch(predictor: Predictor, calls: Sequence[Call]) -> list[dict[str, Any]]:
    """One Predictor call for every input of `calls` (same model version and options);
    the predict job's result ({model, version, outputs, predictions}) per call."""
    from workers.kinds.predict import explain_options, predict_inputs, prediction_options

    spec = calls[0].spec
    inputs = [x for call in calls for x in call.spec["inputs"]]
    predictions = predict_inputs(
        predictor,
        inputs,
        label=calls[0].label,
        options=prediction_options(spec),
        explain=explain_options(spec, predictor.input["kind"]),
    )
    outputs = list(predictor.output_names)
    return [
        {"model": spec["model_name"], "version": spec["version"], "predictions": mine, "outputs": outputs}
        for mine in split_results(calls, predictions)
    ]
