"""Training overhead: seconds per epoch through the platform vs a bare loop in one process.

Platform: the dataset is uploaded over HTTP, a `train` job submitted, and one solo
`medmaas worker` runs it (checkpoint every epoch, metric/progress events, heartbeats,
cancel polls). epoch_seconds comes from the job's metric events; the epoch cadence
(time between consecutive metric events: includes the checkpoint write and the events)
and the job's wall time (started_at -> finished_at) are reported too.

Bare: a fresh Python process with the same environment (same OMP/MKL thread count, and
torch.set_num_threads to the same number) loads the very file the platform stored,
builds the same model with the same hyper-parameters and seed, and runs
train_one_epoch + evaluate(val) per epoch (the same loaders fit() builds), with no
checkpoints, no events, no database.

Runs are sequential, never concurrent: bare, platform, bare again (the bare figure is
the mean of the two, which brackets the platform run in time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Api, Stack, log, machine_info, now_iso, row, thread_env

NAME = "training_overhead"

MODELS = {
    "rnn": {"label": "RNN (GRU) on solubility, regression", "kind": "sequences",
            "spec": {"arch": "rnn", "task": "regression", "target": "solubility", "batch_size": 32, "lr": 3e-3,
                     "seed": 1, "model": {"cell": "gru", "embedding_dim": 48, "hidden_size": 96}, "device": "cpu"},
            "epochs": {"quick": 3, "full": 8}},
    "cnn": {"label": "CNN on digits npz, classification", "kind": "images",
            "spec": {"arch": "cnn", "task": "classification", "batch_size": 64, "seed": 0, "device": "cpu"},
            "epochs": {"quick": 4, "full": 15}},
}


# --------------------------------------------------------------------------- bare loop


def bare_train(arch: str, data_path: str, spec: dict[str, Any], class_names: list | None, threads: int) -> dict[str, Any]:
    """The bare baseline: library calls only (what fit() does per epoch, minus checkpoints,
    events and cancel polls). Returns epoch seconds and the wall time."""
    import torch

    torch.set_num_threads(threads)
    t_start = time.monotonic()
    from workers.kinds.train import model_params
    from workers.ml import data as mldata
    from workers.ml.models import build_model
    from workers.ml.training import (TrainConfig, autocast_dtype_for, evaluate, make_optimizer, resolve_device,
                                     seed_everything, train_one_epoch)

    if arch == "rnn":
        import pandas as pd

        data = mldata.load_sequence_frame(pd.read_parquet(data_path), text_column="text", target_columns=spec["target"],
                                          task=spec["task"], tokenizer=spec.get("tokenizer") or "smiles", split=None,
                                          seed=spec["seed"], max_len=spec["max_len"], canonicalize_smiles=False)
    else:
        data = mldata.load_image_npz(data_path, task=spec["task"], split=None, seed=spec["seed"], class_names=class_names)
    seed_everything(spec["seed"])
    model = build_model(arch, model_params(spec, data))
    cfg = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"], lr=spec["lr"], optimizer=spec["optimizer"],
                      weight_decay=spec["weight_decay"], scheduler=spec["scheduler"], grad_clip=spec["grad_clip"],
                      seed=spec["seed"], device=spec["device"], max_len=spec["max_len"])
    device = resolve_device(cfg.device)
    amp = autocast_dtype_for(device)
    seed_everything(cfg.seed)
    model.to(device)
    task = data.task
    optimizer = make_optimizer(model, cfg)
    eval_bs = cfg.batch_size * 4
    loaders = {k: mldata.make_loader(ds, cfg.batch_size if k == "train" else eval_bs, shuffle=k == "train",
                                     seed=cfg.seed, device=device, num_workers=0)
               for k, ds in data.splits().items()}
    epoch_s, epoch_cpu, losses = [], [], []
    t_train = time.monotonic()
    for epoch in range(1, cfg.epochs + 1):
        t0, c0 = time.monotonic(), time.process_time()
        loaders["train"].batch_sampler.set_epoch(epoch)
        loss = train_one_epoch(model, loaders["train"], optimizer, task, device, autocast_dtype=amp,
                               grad_clip=cfg.grad_clip)
        val = evaluate(model, loaders["val"], task, device, autocast_dtype=amp) if "val" in loaders else {}
        epoch_s.append(time.monotonic() - t0)
        epoch_cpu.append(time.process_time() - c0)
        losses.append({"train_loss": loss, "val_loss": val.get("loss")})
    train_s = time.monotonic() - t_train
    test = evaluate(model, loaders["test"], task, device, autocast_dtype=amp) if "test" in loaders else {}
    return {"epoch_seconds": epoch_s, "epoch_cpu_s": epoch_cpu, "train_s": train_s, "wall_s": time.monotonic() - t_start, "losses": losses,
            "test": test, "torch_threads": torch.get_num_threads(), "device": str(device),
            "batches_per_epoch": len(loaders["train"]), "rows": data.info}


def run_bare_subprocess(st: Stack, payload: dict[str, Any], threads: int) -> dict[str, Any]:
    env = st.env(thread_env(threads))
    out = subprocess.run([sys.executable, "-m", "bench.training_overhead", "--bare", json.dumps(payload)],
                         capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]),
                         timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"bare run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- platform


def _median_after_first(xs: list[float]) -> float:
    xs = xs[1:] if len(xs) > 1 else xs
    return statistics.median(xs)


def _ts(s: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(s).timestamp()


class CpuSampler:
    """Samples a process's CPU seconds (all threads, user+system) every `interval` seconds,
    stamped with time.time(), so CPU use can be read off between two server-side event stamps."""

    def __init__(self, pid: int, interval: float = 0.02):
        import threading

        import psutil

        self.proc, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = self.proc.cpu_times()
            self.samples.append((time.time(), t.user + t.system))
            self._stop.wait(self.interval)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, ts: float) -> float:
        import bisect

        times = [t for t, _ in self.samples]
        i = bisect.bisect_left(times, ts)
        if i <= 0:
            return self.samples[0][1]
        if i >= len(self.samples):
            return self.samples[-1][1]
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (ts - t0) / (t1 - t0) if t1 > t0 else c1


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def platform_train(api: Api, spec: dict[str, Any], timeout: float, worker_pid: int) -> dict[str, Any]:
    t0 = time.time()
    with CpuSampler(worker_pid) as cpu:
        job = api.submit("train", spec)
        done = api.wait(job["id"], timeout=timeout, interval=1.5)
    if done["state"] != "succeeded":
        raise RuntimeError(f"train job {job['id']} {done['state']}: {done.get('error')}")
    events = api.events(job["id"])
    metrics = [e for e in events if e["type"] == "metric"]
    stamps = [_ts(e["ts"]) for e in metrics]
    return {
        "job_id": job["id"],
        "epoch_seconds": [m["data"]["epoch_seconds"] for m in metrics],
        "epoch_cadence_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "epoch_cadence_cpu_s": [cpu.at(b) - cpu.at(a) for a, b in zip(stamps, stamps[1:])],
        "job_cpu_s": cpu.at(_ts(done["finished_at"])) - cpu.at(_ts(done["started_at"])),
        "job_wall_s": _ts(done["finished_at"]) - _ts(done["started_at"]),
        "submit_to_finished_s": _ts(done["finished_at"]) - t0,
        "train_seconds": done["result"].get("train_seconds"),
        "losses": [{"train_loss": m["data"]["train_loss"], "val_loss": m["data"].get("val_loss")} for m in metrics],
        "test": done["result"]["metrics"]["test"],
        "events": len(events),
        "normalised_spec": done["spec"],
    }


def run(quick: bool = False, threads: int | None = None, models: list[str] | None = None) -> dict[str, Any]:
    from workers.kinds.train import TrainSpec

    from app.sample_data import digits_npz, solubility_csv

    threads = threads or (os.cpu_count() or 1)
    size = "quick" if quick else "full"
    result: dict[str, Any] = {"benchmark": NAME, "date": now_iso(), "machine": machine_info(), "quick": quick}
    per_model: dict[str, Any] = {}
    rows: list[dict] = []
    with Stack("train") as st:
        log(f"{NAME}: web + one solo worker, torch threads {threads} in worker and bare runs")
        web, url = st.web(workers=2)
        worker = st.worker("cpu,gpu", extra_env=thread_env(threads))
        api = Api(url, st.key)
        files = {"rnn": solubility_csv(st.home / "solubility.csv"), "cnn": digits_npz(st.home / "digits.npz")}
        for arch in models or list(MODELS):
            m = MODELS[arch]
            options = {"label_columns": "solubility"} if arch == "rnn" else {}
            ds = api.upload(m["kind"], files[arch], **options)
            from app.artifacts import ArtifactStore
            from app.models import Dataset

            with st.db.session() as s:
                data_path = ArtifactStore(st.settings.artifacts).path(s.get(Dataset, ds["id"]).data_uri)
            epochs = m["epochs"][size]
            spec = {**m["spec"], "model_name": f"bench-{arch}", "dataset_id": ds["id"], "epochs": epochs}
            full_spec = TrainSpec().load(spec)
            classes = ds.get("schema", {}).get("classes")
            payload = {"arch": arch, "data_path": str(data_path), "spec": full_spec,
                       "class_names": classes if isinstance(classes, list) else None, "threads": threads}
            load = {"before": loadavg()}
            log(f"{NAME}: {arch}: bare run 1 ({epochs} epochs)")
            bare1 = run_bare_subprocess(st, payload, threads)
            load["after_bare1"] = loadavg()
            log(f"{NAME}: {arch}: platform run ({epochs} epochs through the worker)")
            plat = platform_train(api, spec, timeout=1800, worker_pid=worker.pid)
            load["after_platform"] = loadavg()
            log(f"{NAME}: {arch}: bare run 2")
            bare2 = run_bare_subprocess(st, payload, threads)
            load["after_bare2"] = loadavg()
            if plat["normalised_spec"]["batch_size"] != full_spec["batch_size"]:
                raise RuntimeError("platform and bare specs differ")
            b_epoch = statistics.mean([_median_after_first(bare1["epoch_seconds"]), _median_after_first(bare2["epoch_seconds"])])
            p_epoch = _median_after_first(plat["epoch_seconds"])
            p_cadence = statistics.median(plat["epoch_cadence_s"]) if plat["epoch_cadence_s"] else float("nan")
            b_wall = statistics.mean([bare1["wall_s"], bare2["wall_s"]])
            same_losses = all(abs(a["train_loss"] - b["train_loss"]) <= 1e-4 * max(1.0, abs(b["train_loss"]))
                              for a, b in zip(plat["losses"], bare1["losses"]))
            b_cpu = statistics.mean([_median_after_first(bare1["epoch_cpu_s"]), _median_after_first(bare2["epoch_cpu_s"])])
            p_cpu = statistics.median(plat["epoch_cadence_cpu_s"]) if plat["epoch_cadence_cpu_s"] else float("nan")
            per_model[arch] = {"label": m["label"], "epochs": epochs, "spec": full_spec, "platform": plat,
                               "bare_runs": [bare1, bare2], "same_train_losses_as_bare": same_losses,
                               "loadavg_1min": load}
            rows += [
                row(f"{arch.upper()} s/epoch (metric epoch_seconds, median ep≥2)", p_epoch, b_epoch, unit="s",
                    target="≤ 1.05× bare", met=p_epoch / b_epoch <= 1.05),
                row(f"{arch.upper()} epoch cadence incl. checkpoint + events", p_cadence, b_epoch, unit="s",
                    target="≤ 1.05× bare", met=p_cadence / b_epoch <= 1.05),
                row(f"{arch.upper()} CPU-s/epoch incl. checkpoint + events", p_cpu, b_cpu, unit="CPU s",
                    target="(report)", met=None,
                    note="worker process CPU between metric events vs bare process CPU per epoch"),
                row(f"{arch.upper()} job wall (started→finished) vs bare process", plat["job_wall_s"], b_wall, unit="s",
                    target="(report)", met=None,
                    note="platform also saves the bundle and registers the version"),
            ]
        st.stop(worker)
    result["params"] = {"torch_threads": threads, "thread_env": thread_env(threads), "device": "cpu",
                        "order": "bare, platform, bare (sequential)",
                        "epoch_statistic": "median of epochs 2..N (epoch 1 warms up allocators)",
                        "models": {k: {"label": MODELS[k]["label"], "epochs": v["epochs"]} for k, v in per_model.items()}}
    result["rows"] = rows
    result["models"] = per_model
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bare", metavar="JSON", help="internal: run the bare loop and print JSON")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--models", default="rnn,cnn")
    args = ap.parse_args(argv)
    if args.bare:
        p = json.loads(args.bare)
        print(json.dumps(bare_train(p["arch"], p["data_path"], p["spec"], p["class_names"], p["threads"])))
        return
    print(json.dumps(run(args.quick, args.threads, args.models.split(",")), indent=2, default=str))


if __name__ == "__main__":
    main()
