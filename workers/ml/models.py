"""Architecture registry: build a model from its name and a JSON-able hyper-parameter dict."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .cnn import CNNConfig, ImageCNN
from .rnn import RNNConfig, SequenceRNN

ARCHS: dict[str, tuple[type[CNNConfig] | type[RNNConfig], type[nn.Module]]] = {
    "cnn": (CNNConfig, ImageCNN),
    "rnn": (RNNConfig, SequenceRNN),
}


def model_config(arch: str, params: dict[str, Any]) -> CNNConfig | RNNConfig:
    """Config dataclass for `arch` from a dict; unknown keys are an error (typos fail loudly)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    cfg_cls = ARCHS[arch][0]
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(params) - names
    if unknown:
        raise ValueError(f"unknown {arch} parameters: {sorted(unknown)}; allowed: {sorted(names)}")
    return cfg_cls(**params)


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
