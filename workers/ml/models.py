"""Architecture registry: build a model from its name and a JSON-able hyper-parameter dict
(validated by app/modelconfig.py, the same code the API's submit check runs)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from app.modelconfig import ConfigError, model_config

from .cnn import CNNConfig, ImageCNN
from .rnn import RNNConfig, SequenceRNN

__all__ = ["ARCHS", "ConfigError", "arch_of", "build_model", "config_dict", "model_config"]

ARCHS: dict[str, tuple[type[CNNConfig] | type[RNNConfig], type[nn.Module]]] = {
    "cnn": (CNNConfig, ImageCNN),
    "rnn": (RNNConfig, SequenceRNN),
}


def build_model(arch: str, params: dict[str, Any]) -> nn.Module:
    cfg = model_config(arch, params)
    return ARCHS[arch][1](cfg)


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's hyper-parameters as JSON-able plain types (tuples become lists)."""
    if not isinstance(model, (ImageCNN, SequenceRNN)):
        raise ValueError(f"{type(model).__name__} is not a registered architecture")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.cfg).items()}


def arch_of(model: nn.Module) -> str:
    for name, (_, model_cls) in ARCHS.items():
        if isinstance(model, model_cls):
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")
