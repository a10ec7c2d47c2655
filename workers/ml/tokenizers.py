"""Tokenizers and vocabularies for sequence models (SMILES, clinical code sequences)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, ClassVar

import numpy as np

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

# Atom-level SMILES regex of Schwaller et al. (Molecular Transformer), as published.
SMILES_REGEX = (
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$"
    r"|\%[0-9]{2}|[0-9])"
)
# Same alternatives plus a trailing catch-all, so a character the regex does not know
# becomes a token (mapped to <unk>) instead of being silently dropped by findall, and
# RDKit's `%(123)` ring bonds stay one token. Bracket atoms may not span a newline (see
# encode_batch). No capturing group: findall returns whole matches.
_SMILES_ALTERNATIVES = SMILES_REGEX[1:-1].replace(r"\[[^\]]+]", r"\[[^\]\n]+]", 1) + r"|%\([0-9]+\)|."
_SMILES_PATTERN = re.compile(_SMILES_ALTERNATIVES)
# encode_batch tokenises a whole batch joined by "\n" in one findall; "\n" comes out
# as its own token and marks the row boundaries ("." never matches a newline).
_SEP = "\n"
_SEP_ID = -1
_SMILES_BATCH_PATTERN = re.compile(r"\n|" + _SMILES_ALTERNATIVES)
_WHITESPACE_BATCH_PATTERN = re.compile(r"\n|[^\s]+")


class _Lookup(dict[str, int]):
    """token -> id map whose misses return <unk>; lets `map(d.__getitem__, toks)` run in C."""

    def __missing__(self, key: str) -> int:
        return UNK_ID


class Vocab:
    """Token <-> id table with <pad>=0 and <unk>=1."""

    def __init__(self, itos: Sequence[str]) -> None:
        itos = list(itos)
        if itos[:2] != [PAD, UNK]:
            raise ValueError("vocab must start with <pad>, <unk>")
        if len(set(itos)) != len(itos):
            raise ValueError("vocab has duplicate tokens")
        self.itos = itos
        self.stoi = _Lookup((t, i) for i, t in enumerate(itos))
        self.batch_stoi = _Lookup(self.stoi)  # stoi plus the row separator used by encode_batch
        self.batch_stoi[_SEP] = _SEP_ID

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None) -> Vocab:
        counts = Counter(chain.from_iterable(token_lists))
        counts.pop(PAD, None)
        counts.pop(UNK, None)
        # Most frequent first, ties broken alphabetically so the vocab is deterministic.
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - 2)]
        return cls([PAD, UNK, *ranked])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        return list(map(self.stoi.__getitem__, tokens))


class Tokenizer:
    """Base class: subclasses define `kind`, `tokenize` and `joiner` (for decode)."""

    kind = ""
    joiner = ""
    # Subclasses set the regex that encode_batch runs over a "\n"-joined batch.
    _batch_pattern: ClassVar[re.Pattern[str]]

    def __init__(self, vocab: Vocab | None = None, max_len: int | None = None) -> None:
        self.vocab = vocab
        self.max_len = max_len

    def tokenize(self, text: str) -> list[str]:
        raise NotImplementedError

    def fit(self, texts: Iterable[str], min_freq: int = 1, max_size: int | None = None) -> Tokenizer:
        self.vocab = Vocab.build((self.tokenize(t) for t in texts), min_freq=min_freq, max_size=max_size)
        return self

    @property
    def vocab_size(self) -> int:
        return len(self._vocab())

    def _vocab(self) -> Vocab:
        if self.vocab is None:
            raise RuntimeError("tokenizer has no vocabulary; call fit() first")
        return self.vocab

    def encode(self, text: str) -> list[int]:
        return self._vocab().lookup(self.tokenize(text))

    def decode(self, ids: Iterable[int]) -> str:
        itos = self._vocab().itos
        return self.joiner.join(itos[i] for i in ids if i != PAD_ID)

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode and right-pad a batch.

        Returns (ids int64 [N, L], lengths int64 [N]); sequences longer than max_len
        (default: the tokenizer's max_len) are truncated. L is the longest truncated
        length in the batch, at least 1. The whole batch is tokenised by one regex pass
        and one C-level map over a joined string; splitting and padding are numpy.
        """
        vocab = self._vocab()
        max_len = max_len or self.max_len
        texts = list(texts)
        joined = _SEP.join(texts)
        if not texts or joined.count(_SEP) != len(texts) - 1:  # a text itself holds a newline
            return self._encode_rows(texts, max_len)
        flat = np.fromiter(map(vocab.batch_stoi.__getitem__, self._batch_pattern.findall(joined)), dtype=np.int64)
        seps = np.flatnonzero(flat == _SEP_ID)
        starts = np.concatenate(([0], seps + 1))
        lengths = np.concatenate((seps, [len(flat)])) - starts
        if max_len:
            lengths = np.minimum(lengths, max_len)
        width = max(1, int(lengths.max()))
        cols = np.arange(width)
        mask = cols < lengths[:, None]
        ids = np.zeros((len(texts), width), dtype=np.int64)
        if len(flat):
            ids[mask] = flat[(starts[:, None] + cols)[mask]]
        return ids, lengths

    def _encode_rows(self, texts: Sequence[str], max_len: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Row-by-row encode_batch, for texts that contain the batch separator."""
        get = self._vocab().stoi.__getitem__
        rows = [list(map(get, self.tokenize(t)[:max_len] if max_len else self.tokenize(t))) for t in texts]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        width = max(1, int(lengths.max(initial=0)))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        # Boolean mask of real positions; row-major assignment fills each row left to right.
        ids[np.arange(width) < lengths[:, None]] = np.fromiter(chain.from_iterable(rows), dtype=np.int64)
        return ids, lengths

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab": list(self._vocab().itos), "max_len": self.max_len}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Tokenizer:
        cls = TOKENIZERS[d["type"]]
        return cls(Vocab(d["vocab"]), max_len=d.get("max_len"))


class SmilesTokenizer(Tokenizer):
    """Atom-level SMILES tokens: bracket atoms, Cl/Br, ring bonds (incl. %nn) are single tokens."""

    kind = "smiles"
    joiner = ""
    _batch_pattern = _SMILES_BATCH_PATTERN

    def tokenize(self, text: str) -> list[str]:
        return _SMILES_PATTERN.findall(text)


class WhitespaceTokenizer(Tokenizer):
    """Whitespace-separated tokens, e.g. clinical code sequences `I10 E11.9 N18.3`."""

    kind = "whitespace"
    joiner = " "
    _batch_pattern = _WHITESPACE_BATCH_PATTERN

    def tokenize(self, text: str) -> list[str]:
        return text.split()


TOKENIZERS: dict[str, type[Tokenizer]] = {"smiles": SmilesTokenizer, "whitespace": WhitespaceTokenizer}


def make_tokenizer(kind: str, max_len: int | None = None) -> Tokenizer:
    try:
        return TOKENIZERS[kind](max_len=max_len)
    except KeyError:
        raise ValueError(f"unknown tokenizer {kind!r}; expected one of {sorted(TOKENIZERS)}") from None
