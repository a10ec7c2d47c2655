"""Explained predict vs plain predict of one molecule (integrated gradients, 32 steps), CPU,
same model, same process (target: within 5× plain predict).

In process: a GRU bundle trained here with the project's code (bench/ensemble_scoring.py
`train_bundle`: solubility set, packaged as the train job packages it), loaded by the
Predictor. Both calls are exactly what the predict job runs (workers/kinds/predict.py
`predict_inputs`): plain = canonicalise + tokenise + forward (+ the prediction's extras);
explained = the same plus `explain_smiles` (Captum LayerIntegratedGradients, 32 steps) and
the SVG drawing (workers/ml/draw.py). The two alternate call by call, ≥ 50 of each, after a
warm-up; p50 is reported. A breakdown times IG alone and the drawing alone, and the same
pair for an ensemble of 5 (IG of the members' mean) as a diagnostic.

Platform (unless --no-platform): `POST /api/v1/models/{name}/predict` with
`"explain": true` vs without, on a real stack (bench/common.py: PostgreSQL, Redis, the web
server, one `medmaas worker --queues cpu,inference`), the model trained by a `train` job
with the same architecture; one sequential client, alternating.

Torch runs one intra-op thread everywhere (see bench/README.md on threads).

    python -m bench.explain_speed                 # 60 calls each, platform too
    python -m bench.explain_speed --calls 20 --no-platform
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RESULTS, Api, Stack, log, machine_info, now_iso, row, summary, thread_env, write_and_print
from bench.ensemble_scoring import MODEL, TRAIN, in_child, train_bundle

NAME = "explain_speed"
TARGET = 5.0
STEPS = 32
# celecoxib: a typical drug-sized molecule (26 heavy atoms)
MOLECULE = "Cc1ccc(-c2cc(C(F)(F)F)nn2-c2ccc(S(N)(=O)=O)cc2)cc1"
EXPLAIN = {"method": "ig", "steps": STEPS, "format": "svg"}


def alternate(
    calls: int, fns: dict[str, Callable[[], Any]], warmup: int = 5
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Call every function in turn `calls` times (after `warmup` unmeasured rounds). Returns
    (wall ms, CPU ms of this process) per call: on a shared machine the CPU time is the
    steadier figure (other processes' load stretches wall time, not the work done)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(calls):
        names = list(fns) if i % 2 == 0 else list(reversed(fns))
        for name in names:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append((time.perf_counter() - t0) * 1000.0)
            cpu[name].append((time.process_time() - c0) * 1000.0)
    return wall, cpu


def in_process(
    bundle: str, calls: int, molecule: str = MOLECULE, *, device: str = "cpu", threads: int | None = 1
) -> dict[str, Any]:
    """p50s of plain and explained predict of one molecule with one bundle, plus the parts
    (both return host NumPy data, so on a GPU the work is finished when they return)."""
    import torch

    from workers.kinds.predict import predict_inputs
    from workers.ml.draw import molecule_svg
    from workers.ml.explain import explain_smiles
    from workers.ml.predict import Predictor

    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor.from_bundle(bundle, device)
    canonical = predictor.predict_smiles([molecule])[0]["smiles"]
    if predictor.tokenizer is None:
        raise ValueError("explain_speed needs a SMILES model")
    attribution = explain_smiles(predictor, [canonical], steps=STEPS)[0]
    weights = next(iter(attribution["outputs"].values()))["atom_weights"]

    def plain() -> Any:
        return predict_inputs(predictor, [molecule])

    def explained() -> Any:
        out = predict_inputs(predictor, [molecule], explain=dict(EXPLAIN))
        if "svg" not in out[0].get("explanation", {}):
            raise AssertionError(f"no drawing in the explained prediction: {out[0]}")
        return out

    wall, cpu = alternate(
        calls,
        {
            "plain": plain,
            "explained": explained,
            "ig_only": lambda: explain_smiles(predictor, [canonical], steps=STEPS),
            "svg_only": lambda: molecule_svg(canonical, atom_weights=weights),
        },
    )
    return {
        "molecule": molecule,
        "canonical": canonical,
        "tokens": len(predictor.tokenizer.tokenize(canonical)),
        "members": int(predictor.config.get("members") or 1),
        "device": device,
        "calls": calls,
        "ms": {k: summary(v) for k, v in wall.items()},
        "cpu_ms": {k: summary(v) for k, v in cpu.items()} if device == "cpu" else None,
    }


def platform(calls: int, threads: int) -> dict[str, Any]:
    """POST /models/{name}/predict with and without explain, through the inference worker."""
    from app.sample_data import solubility_csv

    with Stack(NAME) as st:
        _, url = st.web()
        api = Api(url, st.key)
        worker = st.worker("cpu,inference", extra_env=thread_env(threads))
        ds = api.upload("sequences", solubility_csv(st.home / "solubility.csv"), label_columns="solubility")
        spec = {
            "model_name": "sol",
            "dataset_id": ds["id"],
            "arch": "rnn",
            "task": "regression",
            "target": "solubility",
            "model": MODEL,
            "device": "cpu",
            **TRAIN,
        }
        job = api.wait(api.submit("train", spec)["id"], 900)
        if job["state"] != "succeeded":
            raise RuntimeError(f"train job {job['state']}: {job.get('error')}")

        def post(body: dict[str, Any]) -> Callable[[], Any]:
            def call() -> Any:
                r = api.http.post(f"{api.base}/api/v1/models/sol/predict", json=body, timeout=120)
                if r.status_code != 200:
                    raise RuntimeError(f"predict answered {r.status_code}: {r.text[:300]}")
                return r.json()

            return call

        plain = post({"inputs": [MOLECULE]})
        explained = post({"inputs": [MOLECULE], "explain": True, "explain_steps": STEPS})
        item = explained()["predictions"][0]
        if "svg" not in item.get("explanation", {}):
            raise RuntimeError(f"no drawing in the explained prediction: {item}")
        times, _client_cpu = alternate(calls, {"plain": plain, "explained": explained}, warmup=3)
        st.stop(worker)
    return {
        "calls": calls,
        "ms": {k: summary(v) for k, v in times.items()},
        "explanation_keys": sorted(item["explanation"]),
    }


def result_rows(
    single: dict[str, Any], ensemble: dict[str, Any] | None, plat: dict[str, Any] | None, where: str = "in process"
) -> list[dict[str, Any]]:
    ms, cpu = single["ms"], single.get("cpu_ms")
    note = f"{single['tokens']} tokens, {single['calls']} calls each"
    target = f"≤ {TARGET:g}× plain"
    rows = []
    if cpu:  # GPU runs: wall time only (CPU time there is the host feeding the device)
        rows.append(
            row(
                f"explained predict (IG {STEPS} steps + SVG) vs plain predict, one molecule, CPU time p50, {where}",
                cpu["explained"]["p50"],
                cpu["plain"]["p50"],
                unit="CPU ms",
                target=target,
                met=cpu["explained"]["p50"] <= TARGET * cpu["plain"]["p50"],
                note=note + "; CPU time of the process: other load on a shared VM does not stretch it",
            )
        )
    rows += [
        row(
            f"explained predict (IG {STEPS} steps + SVG) vs plain predict, one molecule, wall p50, {where}",
            ms["explained"]["p50"],
            ms["plain"]["p50"],
            unit="ms",
            target=target,
            met=ms["explained"]["p50"] <= TARGET * ms["plain"]["p50"],
            note=note,
        ),
        row(
            f"  of which integrated gradients alone (explain_smiles), wall p50, {where}",
            ms["ig_only"]["p50"],
            ms["plain"]["p50"],
            unit="ms",
            target="(report)",
            met=None,
        ),
        row(
            f"  of which the SVG drawing alone (molecule_svg), wall p50, {where}",
            ms["svg_only"]["p50"],
            ms["plain"]["p50"],
            unit="ms",
            target="(report)",
            met=None,
        ),
    ]
    if ensemble:
        e = ensemble.get("cpu_ms") or ensemble["ms"]
        rows.append(
            row(
                f"ensemble of {ensemble['members']}: explained vs plain predict, one molecule, "
                f"{'CPU time' if 'cpu_ms' in ensemble else 'wall'} p50, {where}",
                e["explained"]["p50"],
                e["plain"]["p50"],
                unit="CPU ms" if "cpu_ms" in ensemble else "ms",
                target="(diagnostic)",
                met=None,
            )
        )
    if plat:
        p = plat["ms"]
        rows.append(
            row(
                "POST /models/{name}/predict explain=true vs plain, one molecule, wall p50 (web + inference worker)",
                p["explained"]["p50"],
                p["plain"]["p50"],
                unit="ms",
                target=target,
                met=p["explained"]["p50"] <= TARGET * p["plain"]["p50"],
                note=f"{plat['calls']} calls each",
            )
        )
    return rows


def run(
    quick: bool = False,
    *,
    calls: int | None = None,
    with_platform: bool = True,
    with_ensemble: bool = True,
    threads: int = 1,
    bundles: Path | None = None,
) -> dict[str, Any]:
    calls = calls or (20 if quick else 60)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "date": now_iso(),
        "machine": machine_info(),
        "quick": quick,
        "params": {
            "calls": calls,
            "steps": STEPS,
            "molecule": MOLECULE,
            "model": MODEL,
            "train": TRAIN,
            "threads": threads,
            "platform": with_platform,
        },
    }
    with tempfile.TemporaryDirectory(prefix="medmaas-bench-explain-") as tmp:
        home = Path(tmp)
        where = bundles or home
        train_bundle(where / "bundle1", 1, home, reuse=bundles is not None)
        single = in_child(f"bench.{NAME}.in_process", threads, bundle=str(where / "bundle1"), calls=calls)
        log(
            f"{NAME}: in process p50 plain {single['ms']['plain']['p50']} ms, "
            f"explained {single['ms']['explained']['p50']} ms"
        )
        ensemble = None
        if with_ensemble:
            train_bundle(where / "bundle5", 5, home, reuse=bundles is not None)
            ensemble = in_child(
                f"bench.{NAME}.in_process", threads, bundle=str(where / "bundle5"), calls=max(10, calls // 3)
            )
    result.update({"in_process": single, "ensemble_in_process": ensemble})
    plat = None
    if with_platform:
        try:
            plat = platform(calls, threads)
        except Exception as e:  # the in-process figures stand on their own
            result["platform_error"] = f"{type(e).__name__}: {e}"
            log(f"{NAME}: platform path failed: {result['platform_error']}")
    result["platform"] = plat
    result["rows"] = result_rows(single, ensemble, plat)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.explain_speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--calls", type=int)
    ap.add_argument("--no-platform", action="store_true")
    ap.add_argument("--no-ensemble", action="store_true")
    ap.add_argument("--bundles", type=Path, help="keep the trained bundles here and reuse them on the next run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    args = ap.parse_args(argv)
    result = run(
        args.quick,
        calls=args.calls,
        with_platform=not args.no_platform,
        with_ensemble=not args.no_ensemble,
        bundles=args.bundles,
    )
    write_and_print(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
