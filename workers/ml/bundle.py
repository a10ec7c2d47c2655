"""Model bundles: `model.safetensors` + `config.json` in one directory. No pickle anywhere."""

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

from app.artifacts import open_read, open_write

from .data import PreparedData
from .models import arch_of, build_model, config_dict
from .training import resolve_device

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
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


def _read(path: Path) -> bytes:
    with open_read(path) as fh:
        return fh.read()


def save_bundle(directory: str | os.PathLike[str], model: nn.Module, config: dict[str, Any]) -> Path:
    """Write the weights and config; `arch`/`model` in config are taken from the model itself."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**config, "format_version": FORMAT_VERSION, "arch": arch_of(model), "model": config_dict(model)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _write(directory / WEIGHTS_FILE, safetensors_save(tensors, metadata={"format": "pt"}))
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
    """Rebuild the module from config.json and load safetensors weights; returns (model in eval mode, config)."""
    config = read_bundle_config(directory)
    model = build_model(config["arch"], config["model"])
    # weights are read whole (bundles are small); safetensors parses bytes without pickle
    state = safetensors_load(_read(Path(directory) / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    device = resolve_device(device) if isinstance(device, str) else device
    return model.to(device).eval(), config
