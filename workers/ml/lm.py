"""SMILES language model: embedding + RNN + next-token head, trained with teacher forcing on
canonical SMILES (the `pretrain` job kind), and its bundle, from which a `train` spec's
`init_from` takes the embedding and recurrent weights and the vocabulary.

Every molecule is read as `<eos> t1 ... tn` and predicts `t1 ... tn <eos>`: one special token
marks both ends, as in GPT-2. The embedding and recurrent layers carry the same names and
shapes as workers/ml/rnn.py SequenceRNN (unidirectional), so a fine-tuned model loads them
as they are and only its output head starts fresh.

The vocabulary is fitted on the canonical training molecules plus one random SMILES of each
of the first VOCAB_RANDOM_ROWS (workers/ml/augment.py), so a fine-tune with random-SMILES
augmentation finds the ring-closure digits random SMILES use.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from app.artifacts import open_read, open_write
from app.modelconfig import RNNConfig

from .augment import vocabulary_texts
from .bundle import write_tensors
from .data import Batch, BatchDataset, make_loader
from .rnn import build_encoder
from .tokenizers import PAD_ID, SmilesTokenizer, Tokenizer, Vocab
from .training import (
    TrainConfig,
    TrainingCancelled,
    epoch_checkpoint,
    make_optimizer,
    resolve_device,
    resume_checkpoint,
    save_checkpoint,
    seed_everything,
)

LM_ARCH = "rnn_lm"
LM_TASK = "language_model"
EOS = "<eos>"
VOCAB_RANDOM_ROWS = 20_000
# The pretrain spec's `model` keys; the rest of RNNConfig is fixed for a language model.
LM_PARAMS = ("cell", "embedding_dim", "hidden_size", "num_layers", "dropout")
ENCODER_PREFIXES = ("embedding.", "rnn.")  # what init_from copies into a SequenceRNN
WEIGHTS_FILE, CONFIG_FILE, FORMAT_VERSION = "model.safetensors", "config.json", 1


def lm_config(params: dict[str, Any]) -> RNNConfig:
    """RNNConfig of a language model: vocab_size plus LM_PARAMS, unidirectional."""
    unknown = set(params) - {"vocab_size", *LM_PARAMS}
    if unknown:
        raise ValueError(f"unknown language-model parameters {sorted(unknown)}; allowed: {list(LM_PARAMS)}")
    return RNNConfig(num_outputs=1, bidirectional=False, **params)


class SmilesLM(nn.Module):
    """(ids [B, L] with 0 = padding, lengths [B]) -> next-token logits [B, L, vocab_size]."""

    cpu_inputs = (1,)

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding, self.rnn = build_encoder(cfg)  # unidirectional: lm_config
        self.dropout = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.detach().to("cpu", torch.int64).clamp(min=1)
        x = self.dropout(self.embedding(ids))
        packed = pack_padded_sequence(x.float(), lengths, batch_first=True, enforce_sorted=False)
        with torch.autocast(device_type=ids.device.type, enabled=False):
            out, _ = self.rnn(packed)
        hidden, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return self.lm_head(self.dropout(hidden))

    def params(self) -> dict[str, Any]:
        return {k: getattr(self.cfg, k) for k in ("vocab_size", *LM_PARAMS)}


# --------------------------------------------------------------------------- data


def fit_vocabulary(smiles: Sequence[str], seed: int, max_len: int | None) -> SmilesTokenizer:
    tok = SmilesTokenizer(max_len=max_len)
    fitted = SmilesTokenizer().fit(vocabulary_texts(smiles[:VOCAB_RANDOM_ROWS], 1, seed) + list(smiles))
    if fitted.vocab is None:  # fit() always sets it
        raise RuntimeError("vocabulary fit failed")
    tok.vocab = Vocab([*fitted.vocab.itos, EOS])
    return tok


class LMSequences(BatchDataset):
    """`<eos> t1..tn <eos>` rows padded with 0: inputs are all but the last token, targets all
    but the first (padding targets are ignored by the loss)."""

    def __init__(self, smiles: Sequence[str], tokenizer: Tokenizer, max_len: int) -> None:
        eos = _eos_id(tokenizer)
        ids, lengths = tokenizer.encode_batch(list(smiles), max_len=max_len - 1)
        n, width = ids.shape
        seq = np.zeros((n, width + 2), dtype=np.int64)
        seq[:, 0] = eos
        seq[:, 1 : width + 1] = ids
        seq[np.arange(n), lengths + 1] = eos
        self.seq = torch.from_numpy(seq)
        self.lengths = torch.from_numpy(lengths + 1)  # input length: <eos> + the tokens

    def __len__(self) -> int:
        return len(self.seq)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        lengths = self.lengths[idx]
        width = max(1, int(lengths.max())) if len(idx) else 1
        rows = self.seq[idx]
        inputs = rows[:, :width].masked_fill(torch.arange(width)[None, :] >= lengths[:, None], PAD_ID)
        return (inputs, lengths), rows[:, 1 : width + 1]


def _eos_id(tokenizer: Tokenizer) -> int:
    vocab = tokenizer.vocab
    if vocab is None or EOS not in vocab:
        raise ValueError(f"the tokenizer's vocabulary lacks {EOS}")
    return vocab.stoi[EOS]


def too_long(smiles: Sequence[str], tokenizer: Tokenizer, max_len: int) -> np.ndarray:
    """Mask of molecules with more than max_len - 1 tokens (no room for <eos>): left out."""
    return np.fromiter((len(tokenizer.tokenize(s)) > max_len - 1 for s in smiles), dtype=bool, count=len(smiles))


# --------------------------------------------------------------------------- training


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over real target tokens, their count)."""
    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=PAD_ID, reduction="sum")
    return loss, int((flat != PAD_ID).sum())


@torch.inference_mode()
def evaluate_lm(
    model: nn.Module, dataset: LMSequences, batch_size: int, device: torch.device, should_stop: Callable[[], bool]
) -> dict[str, float]:
    """Mean token loss, perplexity and next-token accuracy (teacher forcing)."""
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    for (ids, lengths), targets in make_loader(dataset, batch_size, shuffle=False):
        if should_stop():
            raise TrainingCancelled("training cancelled")
        logits = model(ids.to(device), lengths)
        targets = targets.to(device)
        loss, n = token_loss(logits, targets)
        total += float(loss)
        tokens += n
        correct += int(((logits.argmax(-1) == targets) & (targets != PAD_ID)).sum())
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "token_accuracy": correct / max(tokens, 1)}


def fit_lm(
    model: SmilesLM,
    train: LMSequences,
    val: LMSequences,
    cfg: TrainConfig,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Train for cfg.epochs epochs (resuming from the checkpoint), keep the weights of the best
    validation loss. Returns {"val", "best_epoch", "epochs_trained", "history"}."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    loader = make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device)
    eval_bs = cfg.eval_batch_size or cfg.batch_size * 4
    state: dict[str, Any] = {"epoch": 0, "best_loss": None, "best_epoch": 0, "history": []}
    best: dict[str, torch.Tensor] | None = None
    ckpt = resume_checkpoint(checkpoint_path, model, optimizer, None, device)
    if ckpt is not None:
        state = {k: ckpt[k] for k in state}
        best = ckpt.get("best_model")
    last = [0.0]
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        started = time.monotonic()
        model.train()
        sampler = loader.batch_sampler
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total, tokens, n_batches = 0.0, 0, len(loader)
        for i, ((ids, lengths), targets) in enumerate(loader):
            if should_stop():
                raise TrainingCancelled("training cancelled")
            optimizer.zero_grad(set_to_none=True)
            loss, n = token_loss(model(ids.to(device), lengths), targets.to(device))
            (loss / max(n, 1)).backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach())
            tokens += n
            now = time.monotonic()
            if on_progress is not None and now - last[0] >= cfg.progress_interval:
                last[0] = now
                on_progress((epoch - 1 + (i + 1) / n_batches) / cfg.epochs, f"epoch {epoch}/{cfg.epochs}")
        train_loss = total / max(tokens, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss}); lower lr")
        val_metrics = evaluate_lm(model, val, eval_bs, device, should_stop)
        if state["best_loss"] is None or val_metrics["loss"] < state["best_loss"]:
            state["best_loss"], state["best_epoch"] = val_metrics["loss"], epoch
            best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            **{f"val_{k}": v for k, v in val_metrics.items()},
            "epoch_seconds": time.monotonic() - started,
            "best_epoch": state["best_epoch"],
        }
        state["epoch"] = epoch
        state["history"].append(metrics)
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, epoch_checkpoint(model, optimizer, None, best, state, cfg, device))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if on_progress is not None:
            on_progress(epoch / cfg.epochs, f"epoch {epoch}/{cfg.epochs} done")
    if best is not None:
        model.load_state_dict(best)
    return {
        "val": evaluate_lm(model, val, eval_bs, device, should_stop),
        "best_epoch": state["best_epoch"],
        "epochs_trained": state["epoch"],
        "history": state["history"],
    }


# --------------------------------------------------------------------------- bundle


def save_lm_bundle(directory: str | os.PathLike[str], model: SmilesLM, tokenizer: Tokenizer, **extra: Any) -> Path:
    """model.safetensors + config.json (arch rnn_lm, its parameters, the tokenizer, `extra`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        **extra,
        "format_version": FORMAT_VERSION,
        "arch": LM_ARCH,
        "model": model.params(),
        "task": {"type": LM_TASK},
        "output_names": [],
        "input": {"kind": "smiles", "max_len": tokenizer.max_len},
        "tokenizer": tokenizer.to_dict(),
        "torch_version": torch.__version__,
    }
    write_tensors(directory / WEIGHTS_FILE, model.state_dict())
    with open_write(directory / CONFIG_FILE) as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode("utf-8"))
    return directory


def read_lm_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    with open_read(Path(directory) / CONFIG_FILE) as fh:
        config: dict[str, Any] = json.loads(fh.read().decode("utf-8"))
    if config.get("arch") != LM_ARCH:
        raise ValueError(f"{directory} holds a {config.get('arch')!r} model, not a SMILES language model")
    return config


def load_lm_bundle(directory: str | os.PathLike[str]) -> tuple[SmilesLM, Tokenizer, dict[str, Any]]:
    config = read_lm_config(directory)
    model = SmilesLM(lm_config(config["model"]))
    with open_read(Path(directory) / WEIGHTS_FILE) as fh:
        model.load_state_dict(safetensors_load(fh.read()), strict=True)
    return model.eval(), Tokenizer.from_dict(config["tokenizer"]), config


def load_encoder(model: nn.Module, directory: str | os.PathLike[str]) -> list[str]:
    """Copy the pretrained embedding and recurrent weights into `model` (a SequenceRNN built
    with the pretrained vocabulary and sizes); returns the names of the tensors copied."""
    lm, _, _ = load_lm_bundle(directory)
    encoder = {k: v for k, v in lm.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    own = model.state_dict()
    wrong = [k for k, v in encoder.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"the pretrained weights {wrong} do not fit this model (different sizes or cell)")
    model.load_state_dict(encoder, strict=False)
    return sorted(encoder)
