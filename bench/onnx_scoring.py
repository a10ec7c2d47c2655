"""ONNX Runtime vs PyTorch for scoring: the same bundle, the same MOSES molecules, one run.

A GRU and an ensemble of 5 GRUs (bench/ensemble_scoring.py's architecture and training:
solubility set, `fit`, `quality.package`, `save_bundle`) are exported as the train job
exports them (workers/ml/onnx_export.py `export_bundle`: ONNX Runtime checked against
PyTorch on the validation split). Each bundle is then loaded twice, as
`Predictor.from_bundle(..., backend="torch")` and `backend="onnx"`, and both score the
first N MOSES molecules (molsets) three ways: the forward passes alone (`predict_ids` on
token ids: the call the backend replaces), the scoring pipeline on canonical SMILES
(`score_smiles_full(canonical=True)`: tokenising, forward passes, spread/interval/domain
columns; the domain's fingerprints and nearest-neighbour search are the same work for both)
and with RDKit canonicalisation in front. Slices of 4,096 molecules (a scoring shard's
batch; forward batches of 512 as the CPU scoring runner uses) are scored by both backends
back to back, alternating which goes first, `--rounds` times; the best round is kept (on a
shared machine other load only ever adds time). Both backends run one intra-op thread
(ONNX Runtime takes PyTorch's thread count), and the largest |difference| between their
scores over the N molecules is recorded (it must stay within 1e-4).

The ratio is ONNX Runtime's rows/s over PyTorch's: above 1, ONNX Runtime is faster, which is
what makes it the CPU default (workers/ml/onnx_runtime.py, backend "auto").

    python -m bench.onnx_scoring                   # 20,000 rows, 3 rounds
    python -m bench.onnx_scoring --quick           # 3,000 rows, 2 rounds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, log, machine_info, now_iso, row, write_and_print
from bench.ensemble_scoring import MODEL, TRAIN, canonical_all, moses_smiles, solubility_data, train_bundle

NAME = "onnx_scoring"
MEMBERS = (1, 5)
TOLERANCE = 1e-4
SLICE = 4096  # molecules per timed call: a scoring shard's batch (Settings.score_batch_size)


WHAT = {
    "forward": "forward passes only: token ids in",
    "pipeline": "scoring pipeline: canonical SMILES in, tokenising and domain columns included",
    "full": "RDKit canonicalisation + scoring pipeline",
}


def compare(bundle: Path, smiles: list[str], canon: list[str], rounds: int) -> dict[str, Any]:
    """Rows/s of each backend on one bundle for each of WHAT, and their scores' max |diff|.

    The molecules are scored in slices of SLICE (forward batches of 512, as the CPU scoring
    runner sizes them), each slice by both backends back to back (which goes first
    alternates), so load from other processes on a shared machine falls on both alike; a
    round's time is the sum over its slices, and the best round is kept (interference only
    ever adds time)."""
    from workers.ml.predict import Predictor
    from workers.scoring.runner import CPU_FORWARD_BATCH as BATCH

    predictors = {b: Predictor.from_bundle(bundle, "cpu", backend=b) for b in ("torch", "onnx")}
    assert predictors["onnx"].backend == "onnx", "the bundle has no model.onnx"
    tokenizer = predictors["torch"].tokenizer
    assert tokenizer is not None
    max_len = predictors["torch"].input.get("max_len")
    encoded = [tokenizer.encode_batch(canon[i : i + SLICE], max_len) for i in range(0, len(canon), SLICE)]
    calls: dict[str, list[Any]] = {
        "forward": [lambda p, e=e: p.predict_ids(*e, batch_size=BATCH) for e in encoded],
        "pipeline": [
            lambda p, c=canon[i : i + SLICE]: p.score_smiles_full(c, canonical=True, batch_size=BATCH)[0]
            for i in range(0, len(canon), SLICE)
        ],
        "full": [
            lambda p, c=smiles[i : i + SLICE]: p.score_smiles_full(c, batch_size=BATCH)[0]
            for i in range(0, len(smiles), SLICE)
        ],
    }
    for p in predictors.values():  # warm-up: first calls allocate
        calls["pipeline"][0](p)
    seconds: dict[str, dict[str, list[float]]] = {b: {w: [] for w in WHAT} for b in predictors}
    scores: dict[str, list[np.ndarray]] = {b: [] for b in predictors}
    for r in range(rounds):
        for what, slices in calls.items():
            total = dict.fromkeys(predictors, 0.0)
            for i, call in enumerate(slices):
                for b in list(predictors) if (i + r) % 2 == 0 else list(reversed(predictors)):
                    t0 = time.perf_counter()
                    got = call(predictors[b])
                    total[b] += time.perf_counter() - t0
                    if what == "pipeline" and r == 0:
                        scores[b].append(got)
            for b in predictors:
                seconds[b][what].append(round(total[b], 3))
    out: dict[str, Any] = {"rows_canonical": len(canon), "rows": len(smiles)}
    for b in predictors:
        for what in WHAT:
            n = len(smiles) if what == "full" else len(canon)
            out[f"{b}_{what}_seconds"] = seconds[b][what]
            out[f"{b}_{what}_rows_per_s"] = round(n / min(seconds[b][what]), 1)
    out["max_abs_diff"] = float(np.nanmax(np.abs(np.concatenate(scores["onnx"]) - np.concatenate(scores["torch"]))))
    return out


def run(quick: bool = False, *, rows: int | None = None, rounds: int | None = None) -> dict[str, Any]:
    import torch

    from workers.ml.onnx_export import export_bundle

    torch.set_num_threads(1)
    rows = rows or (3000 if quick else 20000)
    rounds = rounds or (2 if quick else 3)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "date": now_iso(),
        "machine": machine_info(),
        "quick": quick,
        "params": {"rows": rows, "rounds": rounds, "model": MODEL, "train": TRAIN, "members": MEMBERS, "threads": 1},
    }
    smiles = moses_smiles(rows)
    canon = canonical_all(smiles)
    measured: dict[int, dict[str, Any]] = {}
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medmaas-bench-onnx-") as tmp:
        home = Path(tmp)
        from app.chem import quiet_rdkit

        with quiet_rdkit():  # a few SDF records RDKit rejects are skipped, not printed
            data = solubility_data(TRAIN["seed"], home)
        for members in MEMBERS:
            bundle = home / f"gru-{members}"
            log(f"training {members} GRU(s)")
            built = train_bundle(bundle, members, home)
            t0 = time.monotonic()
            export = export_bundle(bundle, data)
            export_seconds = round(time.monotonic() - t0, 2)
            if "error" in export:
                raise RuntimeError(f"export failed: {export['error']}")
            log(f"exported and checked in {export_seconds}s (max |diff| {export['max_abs_diff']:.2e}); scoring")
            m = compare(bundle, smiles, canon, rounds)
            m.update(train_seconds=built.get("train_seconds"), export_seconds=export_seconds,
                     export_max_abs_diff=export["max_abs_diff"], export_rows_checked=export["rows_checked"])  # fmt: skip
            measured[members] = m
            label = "1 GRU" if members == 1 else f"ensemble of {members} GRUs"
            ok = m["max_abs_diff"] <= TOLERANCE
            for what, words in WHAT.items():
                onnx, torch_ = m[f"onnx_{what}_rows_per_s"], m[f"torch_{what}_rows_per_s"]
                table.append(
                    row(
                        f"scoring rows/s, ONNX Runtime vs PyTorch, {label} ({words}, {rows:,} MOSES rows)",
                        onnx,
                        torch_,
                        unit="rows/s",
                        target="> 1× PyTorch, |diff| ≤ 1e-4",
                        met=(onnx > torch_) and ok,
                        note=f"max |diff| {m['max_abs_diff']:.1e}",
                    )
                )
    result["measured"] = {str(k): v for k, v in measured.items()}
    result["rows"] = table
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.onnx_scoring", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    args = ap.parse_args(argv)
    write_and_print(run(args.quick, rows=args.rows, rounds=args.rounds), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
