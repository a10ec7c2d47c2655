"""Configurable image CNN (the seed article's model, corrected). Its hyper-parameters are
app/modelconfig.py CNNConfig, validated there (the same check the API runs at submit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.modelconfig import CNNConfig

__all__ = ["CNNConfig", "ImageCNN"]


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
