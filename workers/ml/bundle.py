"""Model bundles: `model.safetensors` + `config.json` (+ `reference.safetensors`, the
applicability-domain reference) in one directory. No pickle anywhere.

config.json may carry `members` (an ensemble's size; weights under `members.{i}.`),
`calibration` (workers/ml/calibration.py) and `domain` (workers/ml/domain.py); bundles
written before these keys existed load and predict as they always did.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from app import artifacts
from app.artifacts import open_read, open_write

from .data import PreparedData
from .ensemble import members_of
from .models import arch_of, build_model, config_dict
from .training import resolve_device

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REFERENCE_FILE = "reference.safetensors"
FORMAT_VERSION = 1


def bundle_config(model: nn.Module, data: PreparedData, **extra: Any) -> dict[str, Any]:
    """The config.json for a model trained on `data`; `extra` (metrics, train config...) is added as is."""
    return {
        "format_version": FORMAT_VERSION,
        "arch": arch_of(model),
        "model": config_dict(model),
        "task": data.head.to_dict(),
        "output_names": data.head.output_names,
        "input": dict(data.input),
        "tokenizer": data.tokenizer.to_dict() if data.tokenizer is not None else None,
        "normalization": data.normalization,
        "torch_version": torch.__version__,
        **extra,
    }


def _json_safe(value: Any) -> Any:
    """NaN/inf (e.g. a diverged metric) become null so config.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write(path: Path, data: bytes) -> None:
    with open_write(path) as fh:  # atomic: the file appears whole or not at all
        fh.write(data)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors (a state dict) to a safetensors artifact file, atomically."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _write(path, safetensors_save(cpu, metadata={"format": "pt"}))


def _read(path: Path) -> bytes:
    with open_read(path) as fh:
        return fh.read()


def save_bundle(
    directory: str | os.PathLike[str],
    model: nn.Module,
    config: dict[str, Any],
    reference: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the weights and config (and the domain reference tensors when given);
    `arch`/`model`/`members` in config are taken from the model itself."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    members = members_of(model)
    if any(config_dict(m) != config_dict(members[0]) for m in members[1:]):
        raise ValueError("ensemble members must share one architecture and hyper-parameters")
    config = {
        **config,
        "format_version": FORMAT_VERSION,
        "arch": arch_of(model),
        "model": config_dict(model),
        "members": len(members),
    }
    write_tensors(directory / WEIGHTS_FILE, model.state_dict())
    if reference:
        write_tensors(directory / REFERENCE_FILE, reference)
    else:
        artifacts.remove(directory / REFERENCE_FILE)  # never a stale reference from an earlier save
    text = json.dumps(_json_safe(config), indent=2, sort_keys=True, allow_nan=False)
    _write(directory / CONFIG_FILE, text.encode("utf-8"))
    return directory


def read_bundle_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    config = json.loads(_read(Path(directory) / CONFIG_FILE).decode("utf-8"))
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported bundle format_version {config.get('format_version')!r}")
    return config


def load_bundle(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module from config.json and load safetensors weights; returns (model in
    eval mode, config). An ensemble bundle (config `members` > 1) gives an Ensemble."""
    config = read_bundle_config(directory)
    model = build_model(config["arch"], config["model"], members=int(config.get("members") or 1))
    # weights are read whole (bundles are small); safetensors parses bytes without pickle
    state = safetensors_load(_read(Path(directory) / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    device = resolve_device(device) if isinstance(device, str) else device
    return model.to(device).eval(), config


def load_reference(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The bundle's applicability-domain reference tensors ({} when it has none)."""
    path = Path(directory) / REFERENCE_FILE
    if not artifacts.exists(path):
        return {}
    return safetensors_load(_read(path))
