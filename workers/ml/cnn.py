"""Configurable image CNN (the seed article's model, corrected)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CNNConfig:
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)  # (H, W)
    num_outputs: int = 2
    channels: tuple[int, ...] = (32, 64)  # one conv block per entry; depth = len(channels)
    kernel_size: int = 3
    hidden: int = 128  # width of the fully connected layer
    dropout: float = 0.25
    batch_norm: bool = True
    # The last feature map is average-pooled down to at most this many cells per side,
    # so the classifier's size does not grow with the image (224x224 inputs stay small).
    pool_to: int = 4

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.image_size)
        self.channels = tuple(int(c) for c in self.channels)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive sizes, got {size}")
        self.image_size = (size[0], size[1])
        if not self.channels:
            raise ValueError("channels must name at least one conv block")
        if self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd so 'same' padding keeps the size")

    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the tensor that is flattened into the classifier."""
        h, w = self.image_size
        for _ in self.channels:
            h, w = (h // 2 if h >= 2 else h), (w // 2 if w >= 2 else w)
        return self.channels[-1], min(h, self.pool_to), min(w, self.pool_to)


class ImageCNN(nn.Module):
    """[B, C, H, W] float -> [B, num_outputs] logits (or standardised values for regression)."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks: list[nn.Module] = []
        c_in = cfg.in_channels
        h, w = cfg.image_size
        for c_out in cfg.channels:
            layers: list[nn.Module] = [
                nn.Conv2d(c_in, c_out, cfg.kernel_size, padding=cfg.kernel_size // 2, bias=not cfg.batch_norm)
            ]
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
            # Halve each side that is still at least 2 pixels (tiny images keep their size).
            kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
            layers.append(nn.MaxPool2d((kh, kw)))
            h, w = h // kh, w // kw
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        c, ph, pw = cfg.feature_shape()
        self.pool = nn.AdaptiveAvgPool2d((ph, pw)) if (ph, pw) != (h, w) else nn.Identity()
        self.fc1 = nn.Linear(c * ph * pw, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.num_outputs)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        x = self.dropout(torch.flatten(x, 1))
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)
