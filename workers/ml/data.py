"""Datasets, splits and DataLoaders for image (.npz) and sequence (DataFrame) data.

Every dataset here is batch-indexed: `ds.__getitems__(indices)` returns one ready batch
`(inputs_tuple, targets)` (the model is called as `model(*inputs)`), so a DataLoader
does one tensor gather per batch instead of one Python call per sample.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from app.chem import canonical_smiles as canonicalize
from app.chem import murcko_scaffold

from .heads import ClassificationHead, Head, MultilabelHead, RegressionHead
from .tokenizers import Tokenizer, make_tokenizer

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
MAX_INVALID_EXAMPLES = 20

# One ready batch: (model inputs, encoded targets); the model is called as model(*inputs).
Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


# --------------------------------------------------------------------------- datasets


_T = TypeVar("_T")


def _collate_batch(batch: _T) -> _T:
    """Datasets already return whole batches; the DataLoader must not re-collate them."""
    return batch


def unit_scale(max_value: float, is_float: bool) -> float:
    """Divisor that maps pixel values into [0, 1]: floats <= 1 are already there,
    otherwise 8-bit, then 16-bit (e.g. DICOM-derived) ranges are assumed."""
    if is_float and max_value <= 1.0:
        return 1.0
    if max_value <= 255:
        return 255.0
    if max_value <= 65535:
        return 65535.0
    return float(max_value)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Pixels -> float32 in [0, 1] (uint8 / 255; other dtypes by `unit_scale`)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    max_value = float(images.max()) if images.numel() else 0.0
    scale = unit_scale(max_value, images.is_floating_point())
    images = images.float()
    return images / scale if scale != 1.0 else images


class BatchDataset(Dataset[Batch]):
    """A sized dataset indexed by whole batches (`__getitems__`)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])


class ImageDataset(BatchDataset):
    """Images kept compact (uint8 when given so) and normalised per batch."""

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.images, self.targets = images, targets  # images [N, C, H, W]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = (to_unit_range(self.images[idx]) - self.mean) / self.std
        return (x,), self.targets[idx]


class SequenceDataset(BatchDataset):
    """Padded token ids; each batch is trimmed to its own longest sequence."""

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> None:
        self.ids, self.lengths, self.targets = ids, lengths, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        lengths = self.lengths[idx]
        width = max(1, int(lengths.max())) if len(idx) else 1
        return (self.ids[idx, :width], lengths), self.targets[idx]


@dataclass
class PreparedData:
    """Train/val/test datasets plus what a bundle must record to reproduce the inputs."""

    train: BatchDataset
    val: BatchDataset | None
    test: BatchDataset | None
    head: Head
    input: dict[str, Any]  # {"kind": "image", "channels", "size": [H, W]} or {"kind": "smiles"|"tokens", "max_len"}
    normalization: dict[str, list[float]] | None = None  # images: {"mean": [...], "std": [...]} per channel
    tokenizer: Tokenizer | None = None
    info: dict[str, Any] = field(default_factory=dict)  # rows per split, invalid rows, split method
    # sequence data: each split's texts (canonical SMILES / token strings), row-aligned with its dataset
    texts: dict[str, list[str]] = field(default_factory=dict)

    def splits(self) -> dict[str, BatchDataset]:
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test)) if v is not None}


# --------------------------------------------------------------------------- splits


def _fractions(split: Mapping[str, Any] | None) -> dict[str, float]:
    """Normalised train/val/test fractions; defaults when `split` names none of them."""
    split = split or {}
    given = any(k in split for k in SPLITS)
    f = {k: float(split.get(k, 0.0)) if given else DEFAULT_FRACTIONS[k] for k in SPLITS}
    if min(f.values()) < 0 or f["train"] <= 0:
        raise ValueError(f"split fractions must be >= 0 with train > 0, got {f}")
    total = sum(f.values())
    return {k: v / total for k, v in f.items()}


def _split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    sizes = {}
    for k in ("val", "test"):
        size = round(n * fractions[k])
        if fractions[k] > 0 and n >= 3:
            size = max(size, 1)  # a requested split is never silently empty
        sizes[k] = size
    sizes["train"] = n - sizes["val"] - sizes["test"]
    if sizes["train"] < 1:
        raise ValueError(f"not enough rows ({n}) for split {dict(fractions)}")
    return sizes


def random_split_indices(n: int, fractions: Mapping[str, float] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    fractions = _fractions(fractions)
    sizes = _split_sizes(n, fractions)
    perm = np.random.default_rng(seed).permutation(n)
    a, b = sizes["train"], sizes["train"] + sizes["val"]
    return {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def scaffold_split_indices(
    smiles: Sequence[str], fractions: Mapping[str, float] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Bemis-Murcko scaffold split: all molecules sharing a scaffold land in one split.

    Balanced as in chemprop: scaffold sets too big for val/test are placed first, then
    the rest in seeded random order, each into the first split with room left.
    """
    fractions = _fractions(fractions)
    target = _split_sizes(len(smiles), fractions)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(smiles):
        groups[murcko_scaffold(s)].append(i)
    sets = sorted(groups.values(), key=lambda g: g[0])  # deterministic before shuffling
    rng = np.random.default_rng(seed)
    big = [g for g in sets if len(g) > target["val"] / 2 or len(g) > target["test"] / 2]
    small = [g for g in sets if not (len(g) > target["val"] / 2 or len(g) > target["test"] / 2)]
    big = [big[i] for i in rng.permutation(len(big))]
    small = [small[i] for i in rng.permutation(len(small))]
    out: dict[str, list[int]] = {k: [] for k in SPLITS}
    for g in big + small:
        fits = [k for k in SPLITS if len(out[k]) + len(g) <= target[k]]
        # A set that fits nowhere goes where the most room is left (train for huge sets).
        k = fits[0] if fits else max(SPLITS, key=lambda s: target[s] - len(out[s]))
        out[k].extend(g)
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


# --------------------------------------------------------------------------- images


def _channels_first(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim == 4 and images.shape[-1] <= 4:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise ValueError(f"{name}: expected (N,H,W) or (N,H,W,C) with C<=4, got shape {images.shape}")


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of [N, C, H, W] images after scaling to [0, 1]."""
    c = images.shape[1]
    s, ss, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(images), chunk):
        x = to_unit_range(images[start : start + chunk]).double()
        s += x.sum(dim=(0, 2, 3))
        ss += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / max(count, 1)
    std = (ss / max(count, 1) - mean * mean).clamp(min=0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.tolist(), std.tolist()


def load_image_npz(
    source: str | os.PathLike[str] | IO[bytes] | Mapping[str, np.ndarray],
    *,
    task: str | None = None,
    split: Mapping[str, Any] | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
) -> PreparedData:
    """Images in the MedMNIST layout: a .npz path/file object, or a mapping of arrays.

    task: None infers classification for (N,)/(N,1) labels and multilabel for (N,K);
    "regression" reads labels as real values. The file's val_*/test_* arrays are used
    where present; missing splits are carved from train with `split` fractions.
    """
    if isinstance(source, Mapping):
        arrays = source
    else:
        with np.load(source, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise ValueError("npz must contain train_images and train_labels")
    raw = {k: (arrays[f"{k}_images"], arrays[f"{k}_labels"]) for k in SPLITS if f"{k}_images" in arrays}
    for k, (x, y) in raw.items():
        if len(x) != len(y):
            raise ValueError(f"{k}_images has {len(x)} rows but {k}_labels has {len(y)}")
    images = {k: _channels_first(np.asarray(x), f"{k}_images") for k, (x, _) in raw.items()}
    if any(x.dtype != np.uint8 for x in images.values()):
        # One scale for every split (a per-batch choice would scale batches differently).
        max_value = max(float(x.max()) for x in images.values() if x.size)
        scale = unit_scale(max_value, images["train"].dtype.kind == "f")
        images = {k: (x.astype(np.float32) / scale) for k, x in images.items()}
    labels = {k: np.asarray(y).reshape(len(y), -1) for k, (_, y) in raw.items()}
    shapes = {x.shape[1:] for x in images.values()}
    if len(shapes) != 1:
        raise ValueError(f"image shapes differ between splits: {sorted(shapes)}")

    missing = [k for k in ("val", "test") if k not in images]
    method = "given"
    if missing:
        fractions = _fractions(split)
        n = len(images["train"])
        perm = np.random.default_rng(seed).permutation(n)
        start = 0
        for k in missing:
            size = round(n * fractions[k])
            if fractions[k] > 0 and n >= 3:
                size = max(size, 1)
            pick = np.sort(perm[start : start + size])
            start += size
            images[k], labels[k] = images["train"][pick], labels["train"][pick]
        keep = np.sort(perm[start:])
        if len(keep) == 0:
            raise ValueError("not enough training images for the requested split")
        images["train"], labels["train"] = images["train"][keep], labels["train"][keep]
        method = "given+random" if len(missing) < 2 else "random"

    k_cols = labels["train"].shape[1]
    task = task or ("classification" if k_cols == 1 else "multilabel")
    if task == "classification" and k_cols > 1:
        task = "multilabel"
    if task == "classification":
        n_classes = int(max(int(y.max()) for y in labels.values() if len(y))) + 1
        names = list(class_names) if class_names else [str(i) for i in range(n_classes)]
        if len(names) < n_classes:
            raise ValueError(f"labels go up to {n_classes - 1} but only {len(names)} class names given")
        head: Head = ClassificationHead(names)
    elif task == "multilabel":
        head = MultilabelHead(list(class_names) if class_names else [str(i) for i in range(k_cols)])
    elif task == "regression":
        head = RegressionHead(list(target_names) if target_names else [f"y{i}" for i in range(k_cols)])
        head.fit(labels["train"])
    else:
        raise ValueError(f"unknown task {task!r}")

    train_images = torch.from_numpy(images["train"])
    mean, std = channel_stats(train_images)
    datasets = {
        k: ImageDataset(torch.from_numpy(images[k]), head.encode_targets(labels[k]), mean, std)
        if len(images[k])
        else None
        for k in SPLITS
    }
    train = datasets["train"]
    if train is None:
        raise ValueError("training split is empty")
    c, h, w = images["train"].shape[1:]
    return PreparedData(
        train=train,
        val=datasets["val"],
        test=datasets["test"],
        head=head,
        input={"kind": "image", "channels": int(c), "size": [int(h), int(w)]},
        normalization={"mean": mean, "std": std},
        info={"split": method, "rows": {k: len(images[k]) for k in SPLITS}},
    )


# --------------------------------------------------------------------------- sequences


def load_sequence_frame(
    df: pd.DataFrame,
    *,
    text_column: str = "smiles",
    target_columns: Sequence[str] | str,
    task: str = "classification",
    tokenizer: str = "smiles",
    split: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_len: int | None = 256,
    min_freq: int = 1,
    canonicalize_smiles: bool = True,
    augment: int = 0,
    augment_seed: int | None = None,
    vocabulary: Tokenizer | None = None,
) -> PreparedData:
    """Sequence data from a DataFrame of text + target column(s).

    tokenizer: "smiles" (RDKit-canonicalised, invalid rows counted and dropped) or
    "whitespace". task: classification (one column; several columns mean multilabel),
    multilabel, or regression (standardised on train). split: fractions plus optional
    "method" ("random" default, "scaffold" for SMILES, or "column" with "column" naming
    a train/val/test column). The vocabulary is fitted on the training split only.

    augment: n random SMILES per training molecule per epoch (workers/ml/augment.py; SMILES
    only), drawn from the stream of `augment_seed` (default `seed`); the vocabulary then also
    sees n random SMILES of each training molecule. vocabulary: a fitted tokenizer to use
    instead of fitting one (a pretrained language model's, for `init_from`); its tokens are
    kept as they are, and tokens it lacks read as <unk>.
    """
    if augment and tokenizer != "smiles":
        raise ValueError("random-SMILES augmentation needs SMILES input")
    targets = [target_columns] if isinstance(target_columns, str) else list(target_columns)
    for col in [text_column, *targets]:
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in data; columns: {list(df.columns)}")
    if task == "classification" and len(targets) > 1:
        task = "multilabel"
    info: dict[str, Any] = {"rows_in": len(df), "invalid_rows": 0, "invalid_examples": [], "missing_target_rows": 0}

    texts = df[text_column].astype("string").fillna("").tolist()
    keep = np.ones(len(df), dtype=bool)
    if tokenizer == "smiles" and canonicalize_smiles:
        for i, s in enumerate(texts):
            canon, err = canonicalize(s)
            if canon is None:
                keep[i] = False
                info["invalid_rows"] += 1
                if len(info["invalid_examples"]) < MAX_INVALID_EXAMPLES:
                    info["invalid_examples"].append({"row": i, "text": s, "error": err})
            else:
                texts[i] = canon

    if task == "classification":
        col = df[targets[0]]
        if pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
            col = col.astype("Int64")  # 0.0/1.0 read from a CSV with gaps -> classes "0"/"1"
        has_target = col.notna().to_numpy()
        values = col[has_target & keep]
        classes = sorted(values.unique().tolist(), key=lambda v: (isinstance(v, str), v))
        if len(classes) < 2:
            raise ValueError(f"target {targets[0]!r} needs at least two classes, found {classes}")
        index = {v: i for i, v in enumerate(classes)}
        y = np.full((len(df), 1), -1, dtype=np.int64)
        y[has_target, 0] = col[has_target].map(index).fillna(-1).to_numpy(dtype=np.int64)
        head: Head = ClassificationHead([str(c) for c in classes])
    elif task in ("multilabel", "regression"):
        y = df[targets].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        has_target = ~np.isnan(y).all(axis=1)
        if task == "multilabel":
            bad = ~np.isnan(y) & (y != 0) & (y != 1)
            if bad.any():
                raise ValueError("multilabel targets must be 0, 1 or empty")
            head = MultilabelHead(targets)
        else:
            head = RegressionHead(targets)
    else:
        raise ValueError(f"unknown task {task!r}")
    info["missing_target_rows"] = int((keep & ~has_target).sum())
    keep &= has_target
    rows = np.flatnonzero(keep)
    texts = [texts[i] for i in rows]
    y = y[rows]

    split = dict(split or {})
    method = split.pop("method", "random")
    if method == "column":
        col = split.get("column", "split")
        if col not in df.columns:
            raise ValueError(f"split column {col!r} not in data")
        aliases = {"valid": "val", "validation": "val", "dev": "val", "training": "train", "testing": "test"}
        names = df[col].astype(str).str.strip().str.lower().replace(aliases).to_numpy()[rows]
        idx = {k: np.flatnonzero(names == k) for k in SPLITS}
    elif method == "scaffold":
        if tokenizer != "smiles":
            raise ValueError("scaffold split needs SMILES input")
        idx = scaffold_split_indices(texts, split or None, seed)
    elif method == "random":
        idx = random_split_indices(len(texts), split or None, seed)
    else:
        raise ValueError(f"unknown split method {method!r}")
    if len(idx["train"]) == 0:
        raise ValueError("training split is empty")

    if isinstance(head, RegressionHead):
        head.fit(y[idx["train"]])
    train_texts = [texts[i] for i in idx["train"]]
    if vocabulary is not None:
        if vocabulary.kind != tokenizer or vocabulary.vocab is None:
            raise ValueError(f"the given vocabulary must be a fitted {tokenizer} tokenizer")
        tok = type(vocabulary)(vocabulary.vocab, max_len=max_len)
    else:
        tok = make_tokenizer(tokenizer, max_len=max_len)
        if augment:
            from .augment import vocabulary_texts

            tok.fit(vocabulary_texts(train_texts, augment, seed), min_freq=min_freq)
        else:
            tok.fit(train_texts, min_freq=min_freq)
    datasets: dict[str, BatchDataset | None] = {}
    for k in SPLITS:
        if len(idx[k]) == 0:
            datasets[k] = None
            continue
        encoded = head.encode_targets(y[idx[k]])
        if k == "train" and augment:
            from .augment import AugmentedSequences

            seed_k = seed if augment_seed is None else augment_seed
            datasets[k] = AugmentedSequences(train_texts, encoded, tok, augment, seed_k)
            continue
        ids, lengths = tok.encode_batch([texts[i] for i in idx[k]])
        datasets[k] = SequenceDataset(torch.from_numpy(ids), torch.from_numpy(lengths), encoded)
    train_lengths = [len(tok.tokenize(texts[i])) for i in idx["train"]]
    info.update(
        {
            "split": method,
            "rows": {k: len(idx[k]) for k in SPLITS},
            "truncated_train_rows": int(sum(n > max_len for n in train_lengths)) if max_len else 0,
            "vocab_size": tok.vocab_size,
            **({"augment": {"random_smiles": augment}} if augment else {}),
        }
    )
    train = datasets["train"]
    if train is None:  # not reached: an empty training split is rejected above
        raise ValueError("training split is empty")
    return PreparedData(
        train=train,
        val=datasets["val"],
        test=datasets["test"],
        head=head,
        input={"kind": "smiles" if tokenizer == "smiles" else "tokens", "max_len": max_len},
        tokenizer=tok,
        info=info,
        texts={k: [texts[i] for i in idx[k]] for k in SPLITS if len(idx[k])},
    )


# --------------------------------------------------------------------------- loaders


def length_buckets(lengths: np.ndarray, batch_size: int, chunk_size: int | None = None) -> list[np.ndarray]:
    """Index batches of similar length (sorted within chunks of `chunk_size`; None = all).

    For inference: each batch pads only to its own longest member. Callers scatter the
    results back with the returned indices.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    chunk_size = chunk_size or max(n, 1)
    batches: list[np.ndarray] = []
    for start in range(0, n, chunk_size):
        chunk = np.arange(start, min(start + chunk_size, n))
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return batches


class EpochBatchSampler(Sampler[list[int]]):
    """Index batches whose order depends only on (seed, epoch).

    Call `set_epoch(e)` before each epoch (as with DistributedSampler): a run resumed
    at epoch e then sees exactly the batches an uninterrupted run would. With
    `lengths`, indices are sorted by length within chunks of `bucket_chunk` batches
    and the batch order is shuffled, so RNN batches carry little padding.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        lengths: np.ndarray | None = None,
        bucket_chunk: int = 50,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.bucket_chunk, self.epoch = bucket_chunk, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.lengths is None:
            batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        else:
            chunk = self.batch_size * self.bucket_chunk
            batches = []
            for start in range(0, self.n, chunk):
                c = order[start : start + chunk]
                c = c[np.argsort(self.lengths[c], kind="stable")]
                batches.extend(c[i : i + self.batch_size] for i in range(0, len(c), self.batch_size))
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        for b in batches:
            yield b.tolist()


def make_loader(
    dataset: BatchDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> DataLoader[Batch]:
    lengths = getattr(dataset, "lengths", None)
    sampler = EpochBatchSampler(
        len(dataset), batch_size, shuffle=shuffle, seed=seed, lengths=None if lengths is None else lengths.numpy()
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_collate_batch,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=num_workers > 0,
    )
