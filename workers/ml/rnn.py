"""Configurable sequence RNN that reads the last real step of each sequence. Its
hyper-parameters are app/modelconfig.py RNNConfig, validated there (the same check the API
runs at submit)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from app.modelconfig import RNNConfig

__all__ = ["CELLS", "RNNConfig", "SequenceRNN", "build_encoder"]

CELLS: dict[str, Any] = {
    "rnn": nn.RNN,
    "gru": nn.GRU,
    "lstm": nn.LSTM,
}  # app.modelconfig.CELLS names these


def build_encoder(cfg: RNNConfig) -> tuple[nn.Embedding, nn.Module]:
    """The token embedding (0 = padding) and the recurrent layer of `cfg`, batch first. A model
    keeps them as `embedding` and `rnn`: the language model (workers/ml/lm.py) and SequenceRNN
    share these state-dict keys, which is how `init_from` copies one into the other."""
    embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim, padding_idx=0)
    rnn = CELLS[cfg.cell](
        cfg.embedding_dim,
        cfg.hidden_size,
        num_layers=cfg.num_layers,
        batch_first=True,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
    )
    return embedding, rnn


class SequenceRNN(nn.Module):
    """(ids [B, L] int64 with 0 = padding, lengths [B]) -> [B, num_outputs].

    Sequences are packed, so the recurrent state never sees padding: the forward
    direction's final state is at step lengths-1 and the backward direction's final
    state is at step 0 of each sequence. Appending more padding to a batch therefore
    does not change any prediction.
    """

    cpu_inputs = (1,)  # lengths stay on CPU (pack_padded_sequence needs them there)

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding, self.rnn = build_encoder(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size * (2 if cfg.bidirectional else 1), cfg.num_outputs)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # pack_padded_sequence wants CPU lengths; an empty sequence is read as one <pad>.
        lengths = lengths.detach().to("cpu", torch.int64).clamp(min=1)
        x = self.dropout(self.embedding(ids))
        # Rows that all fill the padded width need no packing, and the final states are the
        # same: skipping it spares the CPU backward through a packed sequence, which grows
        # with length squared (integrated gradients runs equal-length rows).
        if bool((lengths == ids.shape[1]).all()):
            sequence: torch.Tensor | PackedSequence = x.float()
        else:
            sequence = pack_padded_sequence(x.float(), lengths, batch_first=True, enforce_sorted=False)
        # The recurrence runs in fp32 even under bf16 autocast: cuDNN/fused RNN kernels
        # lack or mis-handle bf16 on some builds, and long recurrences lose precision.
        with torch.autocast(device_type=ids.device.type, enabled=False):
            _, h = self.rnn(sequence)  # h is returned in the batch's original order
        if isinstance(h, tuple):  # LSTM: (h_n, c_n)
            h = h[0]
        dirs = 2 if self.cfg.bidirectional else 1
        last = h.view(self.cfg.num_layers, dirs, h.shape[1], self.cfg.hidden_size)[-1]  # top layer
        last = last.transpose(0, 1).reshape(h.shape[1], dirs * self.cfg.hidden_size)
        return self.head(self.dropout(last))
