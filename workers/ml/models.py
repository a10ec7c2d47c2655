"""Architecture registry: build a model from its name and a JSON-able hyper-parameter dict
(validated by app/modelconfig.py, the same code the API's submit check runs)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from app.modelconfig import ConfigError, model_config

from .cnn import CNNConfig, ImageCNN
from .ensemble import Ensemble
from .rnn import RNNConfig, SequenceRNN

__all__ = ["ARCHS", "ConfigError", "arch_of", "build_model", "config_dict", "model_config"]

ARCHS: dict[str, tuple[type[CNNConfig] | type[RNNConfig], type[nn.Module]]] = {
    "cnn": (CNNConfig, ImageCNN),
    "rnn": (RNNConfig, SequenceRNN),
}


def build_model(arch: str, params: dict[str, Any], members: int = 1) -> nn.Module:
    """One model, or an Ensemble of `members` fresh models (each drawing its own initial
    weights from the global RNG) when members > 1."""
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    cfg = model_config(arch, params)
    if members == 1:
        return ARCHS[arch][1](cfg)
    return Ensemble([ARCHS[arch][1](cfg) for _ in range(members)])


def _first_member(model: nn.Module) -> nn.Module:
    return model.members[0] if isinstance(model, Ensemble) else model


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's hyper-parameters as JSON-able plain types (tuples become lists); an
    Ensemble is described by its first member (all members share one architecture)."""
    model = _first_member(model)
    if not isinstance(model, (ImageCNN, SequenceRNN)):
        raise ValueError(f"{type(model).__name__} is not a registered architecture")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.cfg).items()}


def arch_of(model: nn.Module) -> str:
    model = _first_member(model)
    for name, (_, model_cls) in ARCHS.items():
        if isinstance(model, model_cls):
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")
