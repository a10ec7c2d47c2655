"""Architecture hyper-parameters (torch-free): the config dataclasses the workers build their
nn.Modules from (workers/ml/cnn.py, workers/ml/rnn.py), and the train spec's submit-time
check (app/kinds/train.py). One `validate()` serves both, so whatever the API accepts the
worker can build, and whatever the worker refuses the API already refused with a 422 that
names the field.

Also here: the train/val/test split arithmetic both sides share (`resolve_split`,
`split_sizes`), so the submit check can tell whether a dataset has rows enough.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CELLS = ("rnn", "gru", "lstm")
MAX_WIDTH = 65_536  # embedding/hidden/channel widths
MAX_LAYERS = 64
MAX_CONV_BLOCKS = 32
MAX_KERNEL = 31


class ConfigError(ValueError):
    """Invalid hyper-parameters: `errors` maps each field to its messages."""

    def __init__(self, errors: Mapping[str, list[str]]) -> None:
        self.errors = {k: list(v) for k, v in errors.items()}
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in self.errors.items()))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}

    def add(self, name: str, message: str) -> None:
        self.errors.setdefault(name, []).append(message)

    def int_range(self, name: str, value: Any, lo: int, hi: int) -> None:
        if not _is_int(value):
            self.add(name, f"must be an integer, got {value!r}")
        elif not lo <= value <= hi:
            self.add(name, f"must be between {lo} and {hi}, got {value}")

    def boolean(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            self.add(name, f"must be true or false, got {value!r}")

    def dropout(self, name: str, value: Any) -> None:
        if not _is_number(value):
            self.add(name, f"must be a number, got {value!r}")
        elif not 0 <= value < 1:
            self.add(name, f"must be in [0, 1), got {value}")

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors)


@dataclass
class RNNConfig:
    """Sequence RNN (workers/ml/rnn.py SequenceRNN). vocab_size and num_outputs come from
    the data; the rest are the train spec's `model` parameters."""

    vocab_size: int
    num_outputs: int = 1
    cell: str = "gru"  # rnn, gru or lstm
    embedding_dim: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        c = _Checker()
        c.int_range("vocab_size", self.vocab_size, 2, 10_000_000)
        c.int_range("num_outputs", self.num_outputs, 1, 1_000_000)
        if not isinstance(self.cell, str) or self.cell not in CELLS:
            c.add("cell", f"must be one of {', '.join(CELLS)}, got {self.cell!r}")
        c.int_range("embedding_dim", self.embedding_dim, 1, MAX_WIDTH)
        c.int_range("hidden_size", self.hidden_size, 1, MAX_WIDTH)
        c.int_range("num_layers", self.num_layers, 1, MAX_LAYERS)
        c.boolean("bidirectional", self.bidirectional)
        c.dropout("dropout", self.dropout)
        c.raise_if_any()


@dataclass
class CNNConfig:
    """Image CNN (workers/ml/cnn.py ImageCNN). in_channels, image_size and num_outputs come
    from the data; the rest are the train spec's `model` parameters."""

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
        self.validate()
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.channels = tuple(int(ch) for ch in self.channels)

    def validate(self) -> None:
        c = _Checker()
        c.int_range("in_channels", self.in_channels, 1, 4096)
        size = self.image_size
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s >= 1 for s in size)):
            c.add("image_size", f"must be [H, W] with positive integers, got {size!r}")
        c.int_range("num_outputs", self.num_outputs, 1, 1_000_000)
        chans = self.channels
        if not isinstance(chans, (list, tuple)) or not chans:
            c.add("channels", f"must be a non-empty list of positive integers (one per conv block), got {chans!r}")
        elif len(chans) > MAX_CONV_BLOCKS:
            c.add("channels", f"at most {MAX_CONV_BLOCKS} conv blocks, got {len(chans)}")
        elif not all(_is_int(ch) and 1 <= ch <= MAX_WIDTH for ch in chans):
            c.add("channels", f"each entry must be an integer between 1 and {MAX_WIDTH}, got {list(chans)!r}")
        if not _is_int(self.kernel_size):
            c.add("kernel_size", f"must be an integer, got {self.kernel_size!r}")
        elif not (1 <= self.kernel_size <= MAX_KERNEL and self.kernel_size % 2 == 1):
            c.add(
                "kernel_size",
                f"must be odd (so 'same' padding keeps the size) and between 1 and {MAX_KERNEL}, "
                f"got {self.kernel_size}",
            )
        c.int_range("hidden", self.hidden, 1, MAX_WIDTH)
        c.dropout("dropout", self.dropout)
        c.boolean("batch_norm", self.batch_norm)
        c.int_range("pool_to", self.pool_to, 1, 1024)
        c.raise_if_any()

    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the tensor that is flattened into the classifier."""
        h, w = self.image_size
        for _ in self.channels:
            h, w = (h // 2 if h >= 2 else h), (w // 2 if w >= 2 else w)
        return self.channels[-1], min(h, self.pool_to), min(w, self.pool_to)


CONFIGS: dict[str, type[CNNConfig] | type[RNNConfig]] = {"cnn": CNNConfig, "rnn": RNNConfig}
# Fields the worker fills from the data; the rest are what a train spec's `model` may set.
DATA_FIELDS: dict[str, frozenset[str]] = {
    "cnn": frozenset({"in_channels", "image_size", "num_outputs"}),
    "rnn": frozenset({"vocab_size", "num_outputs"}),
}
# Stand-ins for the data fields when checking a spec before the data is read.
_PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "cnn": {"in_channels": 1, "image_size": (28, 28), "num_outputs": 2},
    "rnn": {"vocab_size": 2, "num_outputs": 1},
}


def field_names(arch: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CONFIGS[arch])}


def user_params(arch: str) -> set[str]:
    """The hyper-parameters a train spec's `model` may set for `arch`."""
    return field_names(arch) - DATA_FIELDS[arch]


def model_config(arch: str, params: Mapping[str, Any]) -> CNNConfig | RNNConfig:
    """Config dataclass for `arch` from a dict; unknown keys are an error (typos fail loudly),
    invalid values raise ConfigError naming each field."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(CONFIGS)}")
    names = field_names(arch)
    unknown = set(params) - names
    if unknown:
        raise ValueError(f"unknown {arch} parameters: {sorted(unknown)}; allowed: {sorted(names)}")
    return CONFIGS[arch](**params)


def check_params(arch: str, params: Mapping[str, Any]) -> dict[str, list[str]]:
    """Errors per field of a train spec's `model` parameters ({} when valid), checked by the
    same `validate()` the worker's model build runs."""
    unknown = set(params) - user_params(arch)
    if unknown:
        return {name: [f"unknown {arch} parameter; allowed: {sorted(user_params(arch))}"] for name in sorted(unknown)}
    try:
        model_config(arch, {**_PLACEHOLDERS[arch], **params})
    except ConfigError as exc:
        return exc.errors
    return {}


# --------------------------------------------------------------------------- splits

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
MIN_TRAIN_ROWS = 8
MIN_EVAL_ROWS = 1  # val/test, when their fraction is above 0


def resolve_split(split: Mapping[str, Any] | None) -> dict[str, float]:
    """Complete train/val/test fractions, each in [0, 1) (train may be 1), summing to 1.
    Raises ConfigError naming the field.

    None given: 0.8 / 0.1 / 0.1. Train missing: a missing val or test takes its default
    (0.1) and train the rest ({"val": 0.1, "test": 0.1} -> train 0.8). Train given: the
    missing val/test share the rest ({"train": 0.7, "val": 0.2} -> test 0.1)."""
    split = split or {}
    c = _Checker()
    given: dict[str, float] = {}
    for k in SPLITS:
        v = split.get(k)
        if v is None:
            continue
        if not _is_number(v):
            c.add(k, f"must be a number, got {v!r}")
        elif not (0 <= v < 1 or (k == "train" and v == 1)):
            c.add(k, f"must be in [0, 1), got {v}")
        else:
            given[k] = float(v)
    c.raise_if_any()
    if not given:
        return dict(DEFAULT_FRACTIONS)
    out = dict(given)
    if "train" not in out:
        for k in ("val", "test"):
            out.setdefault(k, DEFAULT_FRACTIONS[k])
        out["train"] = 1.0 - out["val"] - out["test"]
    else:
        missing = [k for k in ("val", "test") if k not in out]
        rest = 1.0 - sum(out.values())
        for k in missing:
            out[k] = max(rest, 0.0) / len(missing)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        named = " + ".join(f"{k} {out[k]:g}" for k in SPLITS)
        c.add("train" if "train" in given else "val", f"train + val + test must sum to 1; {named} = {total:.6g}")
    elif out["train"] <= 0:
        c.add("train", f"val {out['val']:g} + test {out['test']:g} leaves nothing for training")
    c.raise_if_any()
    return {k: round(out[k], 12) for k in SPLITS}


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Rows per split for n rows (as workers/ml/data.py carves them: val/test rounded, at
    least 1 when asked for and n >= 3; train the rest, possibly < 1)."""
    sizes: dict[str, int] = {}
    for k in ("val", "test"):
        size = round(n * fractions.get(k, 0.0))
        if fractions.get(k, 0.0) > 0 and n >= 3:
            size = max(size, 1)
        sizes[k] = size
    sizes["train"] = n - sizes["val"] - sizes["test"]
    return sizes


def carved_sizes(n: int, fractions: Mapping[str, float], carve: Sequence[str] = ("val", "test")) -> dict[str, int]:
    """split_sizes when only the splits in `carve` are cut from the n rows (an image file may
    bring its own val/test)."""
    wanted = {k: (fractions.get(k, 0.0) if k in carve else 0.0) for k in ("val", "test")}
    return split_sizes(n, {"train": fractions.get("train", 1.0), **wanted})


def too_few_rows(n: int, fractions: Mapping[str, float], carve: Sequence[str] = ("val", "test")) -> str | None:
    """Why `n` rows cannot be split as asked (at least MIN_TRAIN_ROWS for training and
    MIN_EVAL_ROWS for each of val/test with a fraction above 0), or None. Only the splits in
    `carve` are cut from the n rows (an image file may bring its own val/test)."""
    wanted = {k: (fractions.get(k, 0.0) if k in carve else 0.0) for k in ("val", "test")}
    sizes = carved_sizes(n, fractions, carve)
    short = sizes["train"] < MIN_TRAIN_ROWS or any(wanted[k] > 0 and sizes[k] < MIN_EVAL_ROWS for k in ("val", "test"))
    if not short:
        return None
    asked = ", ".join(f"{k} {fractions.get(k, 0.0):g}" for k in SPLITS)
    return (
        f"{n} rows are too few to train with split {asked}: this gives train {sizes['train']}, "
        f"val {sizes['val']}, test {sizes['test']}; training needs at least {MIN_TRAIN_ROWS} training rows "
        f"and {MIN_EVAL_ROWS} row for each of val/test whose fraction is above 0"
    )


# --------------------------------------------------------------------------- spec limits


@dataclass(frozen=True)
class TrainLimits:
    """What one training job may ask for (the server's MEDMAAS_MAX_* settings), so one tenant's
    job cannot hold a worker for days or exhaust its memory."""

    max_epochs: int
    max_batch_size: int
    max_len: int
    max_epoch_rows: int  # epochs x training rows (x members x augmented copies)
    max_ensemble: int = 10  # ensemble members


def over_limits(spec: Mapping[str, Any], limits: TrainLimits) -> dict[str, list[str]]:
    """Errors per train spec field beyond the limits ({} when within), each naming the limit."""
    c = _Checker()
    for name, limit, unit in (
        ("epochs", limits.max_epochs, ""),
        ("batch_size", limits.max_batch_size, ""),
        ("max_len", limits.max_len, " tokens"),
        ("ensemble", limits.max_ensemble, " members"),
    ):
        value = spec.get(name)
        if isinstance(value, int) and value > limit:
            c.add(name, f"at most {limit}{unit} on this server, got {value}")
    return c.errors


def over_budget(
    epochs: int, train_rows: int, limits: TrainLimits, *, members: int = 1, random_smiles: int = 0
) -> str | None:
    """Why epochs x training rows exceeds the budget (naming the most epochs that fit), or None.
    Each ensemble member trains on every row, and augmentation adds `random_smiles` copies of
    each row per epoch: both multiply the rows an epoch costs."""
    rows = train_rows * max(members, 1) * (1 + max(random_smiles, 0))
    if epochs * rows <= limits.max_epoch_rows:
        return None
    fits = limits.max_epoch_rows // max(rows, 1)
    what = f"{train_rows} training rows"
    if members > 1:
        what += f" x {members} ensemble members"
    if random_smiles > 0:
        what += f" x {1 + random_smiles} (canonical + {random_smiles} random SMILES)"
    advice = f"use at most {fits} epochs on this dataset" if fits else "even one epoch of this dataset is too many"
    return (
        f"{epochs} epochs x {what} = {epochs * rows} exceeds this server's budget of "
        f"{limits.max_epoch_rows} epoch-rows per job; {advice}"
    )


# --------------------------------------------------------------------------- init_from

# The recurrent layers a language model (workers/ml/lm.py) shares with a SequenceRNN: a
# fine-tune from it takes these from the pretrained model (and must not ask for others).
PRETRAINED_SHAPE_PARAMS = ("cell", "embedding_dim", "hidden_size", "num_layers")


def pretrained_conflicts(pretrained: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, list[str]]:
    """Errors per `model` field that contradicts the pretrained model's shape ({} when none);
    a bidirectional fine-tune cannot start from a left-to-right language model."""
    c = _Checker()
    for name in PRETRAINED_SHAPE_PARAMS:
        if name in model and model[name] != pretrained.get(name):
            c.add(name, f"the pretrained model has {name} {pretrained.get(name)!r}, the spec asks {model[name]!r}")
    if model.get("bidirectional"):
        c.add("bidirectional", "a pretrained language model reads left to right; bidirectional must be false")
    return c.errors


def with_pretrained(pretrained: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's `model` with the pretrained model's shape filled in where it says nothing."""
    return {**{k: pretrained[k] for k in PRETRAINED_SHAPE_PARAMS if k in pretrained}, **model}
