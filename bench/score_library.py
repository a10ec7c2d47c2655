"""Library scoring throughput: the MOSES training set through the platform vs a bare loop.

Platform: the library (gzip CSV) is uploaded over HTTP to `medmaas web`, a `score` job is
submitted, and `medmaas worker` processes (solo pool, as shipped) score it: shards in SQL,
an RDKit process pool per worker, Parquet parts, the ordered merge into one CSV, top-K,
progress events. Throughput = rows / (job started_at -> finished_at), which includes
decompressing the gzip once, indexing shard offsets, and the merge. While a job runs, the
RSS of every worker and its RDKit children is sampled every 0.5 s (psutil: peak and
median), and their CPU time is summed (CPU-seconds per 1,000 rows: the platform's cost
in a form that other load on a shared machine does not distort).

Bare: a fresh Python process with the same model bundle runs the obvious loop in one
process: read the gzip CSV, canonicalise with RDKit, tokenise, forward, write a CSV.

Worker set-ups per library size: 1 and 2 workers as shipped; and "pinned" runs (taskset,
one core per worker, like one-core machines) next to the bare loop on one core, which
isolate the platform's own cost (same single core) and the 1 -> 2 worker scaling of
sharding (2 cores vs 1) from the RDKit pool's use of every core.

The model is a GRU (embedding 48, hidden 96) trained for 2 epochs on the solubility set
through the same API. Runs are sequential, never concurrent.

    python -m bench.score_library                 # 100k rows, then the full 1,584,663
    python -m bench.score_library --rows 20000    # a quick look
    python -m bench.score_library --quick         # what `python -m bench --quick` runs
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from bench.common import RESULTS, Api, Stack, log, machine_info, now_iso, row, wait_for_quiet

NAME = "score_library"
FULL = 1_584_663
MODEL = {"arch": "rnn", "task": "regression", "target": "solubility", "epochs": 2, "batch_size": 32, "lr": 3e-3,
         "seed": 1, "model": {"cell": "gru", "embedding_dim": 48, "hidden_size": 96}, "device": "cpu"}


# --------------------------------------------------------------------------- data


def library_file(rows: int, work: Path) -> Path:
    """The MOSES training set (gzip CSV, header SMILES) or its first `rows` rows."""
    from app.sample_data import moses_library

    src = moses_library()
    if rows >= FULL:
        return src
    dest = work / f"moses-{rows}.csv.gz"
    with gzip.open(src, "rt") as fin, gzip.open(dest, "wt", compresslevel=6) as fout:
        fout.write(fin.readline())
        for i, line in enumerate(fin):
            if i >= rows:
                break
            fout.write(line)
    return dest


# --------------------------------------------------------------------------- memory sampling


class RssSampler:
    """Peak RSS of a set of processes and their children (the RDKit pool), sampled in a thread."""

    def __init__(self, pids: list[int], interval_s: float = 0.5):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.interval = interval_s
        self.peak_total = 0  # all workers and their children together
        self.peak_main = 0  # the largest single worker main process
        self.peak_child = 0  # the largest single RDKit child
        self.samples = 0
        self.totals: list[int] = []  # every sample of all workers + children, for the median
        self.mains: list[int] = []  # every sample of the largest worker main process
        self.cpu_start = self.cpu_end = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = main_max = 0
            for p in self.procs:
                try:
                    main = p.memory_info().rss
                    kids = [c.memory_info().rss for c in p.children(recursive=True)]
                except psutil.Error:
                    continue
                total += main + sum(kids)
                main_max = max(main_max, main)
                self.peak_main = max(self.peak_main, main)
                self.peak_child = max([self.peak_child, *kids])
            self.peak_total = max(self.peak_total, total)
            self.totals.append(total)
            self.mains.append(main_max)
            self.samples += 1
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the workers and their (live) children so far."""
        import psutil

        total = 0.0
        for p in self.procs:
            try:
                for q in [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def __enter__(self) -> "RssSampler":
        self.cpu_start = self.cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu_end = self.cpu_seconds()
        self._stop.set()
        self._thread.join(5)

    def to_dict(self) -> dict[str, Any]:
        import statistics

        mb = 1024 * 1024
        return {"peak_rss_mb_all_workers": round(self.peak_total / mb, 1),
                "median_rss_mb_all_workers": round(statistics.median(self.totals or [0]) / mb, 1),
                "median_rss_mb_worker_main": round(statistics.median(self.mains or [0]) / mb, 1),
                "peak_rss_mb_worker_main": round(self.peak_main / mb, 1),
                "peak_rss_mb_rdkit_child": round(self.peak_child / mb, 1), "rss_samples": self.samples,
                "cpu_seconds": round(self.cpu_end - self.cpu_start, 2)}


# --------------------------------------------------------------------------- bare loop


def bare_score(bundle: str, library: str, out: str, batch_size: int, threads: int,
               forward_batch: int = 512) -> dict[str, Any]:
    """Read, canonicalise, tokenise, forward, write: one process, library calls only. The
    forward uses the platform's CPU sub-batch size, so both run the model the same way."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from app.chem import canonical_smiles, quiet_rdkit
    from workers.ml.predict import Predictor

    predictor = Predictor.from_bundle(bundle, device="cpu")
    started = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    rows = valid = 0
    with gzip.open(library, "rt", newline="") as fin, open(out, "w", newline="") as fout:
        reader, writer = csv.reader(fin), csv.writer(fout)
        next(reader)
        writer.writerow(["row", "smiles", "canonical_smiles", *predictor.output_names, "error"])
        while True:
            chunk = [r[0] for _, r in zip(range(batch_size), reader)]
            if not chunk:
                break
            with quiet_rdkit():
                canon = [canonical_smiles(s) for s in chunk]
            ok = [i for i, (c, _) in enumerate(canon) if c is not None]
            scores = np.full((len(chunk), len(predictor.output_names)), np.nan, dtype=np.float32)
            if ok:
                texts = [canon[i][0] for i in ok]
                ids, lengths = predictor.tokenizer.encode_batch(texts, predictor.input.get("max_len"))
                scores[ok] = predictor.predict_ids(ids, lengths, batch_size=forward_batch)
            for i, (smi, (c, err)) in enumerate(zip(chunk, canon)):
                writer.writerow([rows + i, smi, c or "", *([] if err else scores[i].tolist()), err or ""])
            rows += len(chunk)
            valid += len(ok)
    seconds = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu_before, 2), "rows": rows, "valid": valid,
            "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1),
            "torch_threads": threads, "forward_batch": forward_batch,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_bare(stack: Stack, bundle: str, library: Path, batch_size: int, threads: int,
             pin: Optional[int] = None) -> dict[str, Any]:
    out = stack.home / "bare-scores.csv"
    call = f"bare_score({bundle!r}, {str(library)!r}, {str(out)!r}, {batch_size}, {threads})"
    code = f"import json; from bench.score_library import bare_score; print('RESULT', json.dumps({call}))"
    prefix = ["taskset", "-c", str(pin)] if pin is not None else []
    proc = subprocess.run([*prefix, sys.executable, "-c", code], env=stack.env(), capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"bare loop failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    out.unlink(missing_ok=True)
    return {**json.loads(line[len("RESULT "):]), "pinned_to_core": pin}


# --------------------------------------------------------------------------- platform


def start_worker(stack: Stack, name: str, pin: Optional[int]) -> subprocess.Popen:
    """`medmaas worker --queues cpu` as shipped; pin=k runs it on core k only (taskset), like a
    one-core machine: its RDKit pool and torch threads size themselves to that."""
    from bench.common import wait_for_log

    if pin is None:
        return stack.worker("cpu", name=name)
    proc = stack.spawn(["taskset", "-c", str(pin), sys.executable, "-m", "medmaas.cli", "worker", "--queues", "cpu"], name)
    wait_for_log(proc.log_path, " ready.", 120, proc)  # type: ignore[attr-defined]
    return proc


def run_platform(stack: Stack, api: Api, model: str, library_id: int, n_workers: int, rows: int,
                 pinned: bool = False) -> dict[str, Any]:
    from datetime import datetime

    cores = sorted(os.sched_getaffinity(0))
    workers = [start_worker(stack, f"score-w{n_workers}{'p' if pinned else ''}-{i}",
                            cores[i % len(cores)] if pinned else None) for i in range(n_workers)]
    try:
        with RssSampler([w.pid for w in workers]) as rss:
            submitted = time.monotonic()
            job = api.submit("score", {"model": model, "library_id": library_id, "output": "csv", "top_k": 100})
            done = api.wait(job["id"], timeout=6 * 3600, interval=2.0)
            wall = time.monotonic() - submitted
    finally:
        for w in workers:
            stack.stop(w)
    if done["state"] != "succeeded":
        raise RuntimeError(f"score job {done['id']} {done['state']}: {done.get('error')}")
    res = done["result"]
    started = datetime.fromisoformat(done["started_at"])
    finished = datetime.fromisoformat(done["finished_at"])
    job_s = (finished - started).total_seconds()
    assert res["rows"] == rows, (res["rows"], rows)
    events = api.events(done["id"])
    progress = [e["data"] for e in events if e["type"] == "progress" and "molecules_per_s" in e["data"]]
    return {"workers": n_workers, "pinned_one_core_each": pinned, "job_id": done["id"], "rows": res["rows"], "valid": res["valid"],
            "job_seconds": round(job_s, 3), "rows_per_s": round(res["rows"] / job_s, 1),
            "submit_to_done_s": round(wall, 3), "scoring_seconds": res["scoring_seconds"],
            "scoring_rows_per_s": res["molecules_per_s"], "merge_seconds": res["merge_seconds"],
            "source": res.get("source"), "shards": res["shards"], "progress_events": len(progress),
            **rss.to_dict()}


# --------------------------------------------------------------------------- main


def bench_size(stack: Stack, api: Api, model: str, bundle: str, rows: int, shard_rows: int, batch_size: int,
               threads: int, worker_counts: list[str]) -> dict[str, Any]:
    lib_path = library_file(rows, stack.home)
    lib = api.upload("library", lib_path)
    log(f"[{rows:,} rows] library uploaded: dataset {lib['id']}, {lib['bytes']:,} bytes")
    out: dict[str, Any] = {"rows": rows, "shard_rows": shard_rows, "batch_size": batch_size,
                           "load_before": round(os.getloadavg()[0], 2)}
    out["bare"] = run_bare(stack, bundle, lib_path, batch_size, threads)
    log(f"[{rows:,} rows] bare: {out['bare']['rows_per_s']:,.0f} rows/s")
    if any(w.endswith("p") for w in worker_counts):
        out["bare_1core"] = run_bare(stack, bundle, lib_path, batch_size, threads, pin=min(os.sched_getaffinity(0)))
        log(f"[{rows:,} rows] bare on one core: {out['bare_1core']['rows_per_s']:,.0f} rows/s")
    for spec in worker_counts:
        pinned = spec.endswith("p")
        n = int(spec.rstrip("p"))
        res = run_platform(stack, api, model, lib["id"], n, rows, pinned)
        out[f"platform_{n}w{'_1core_each' if pinned else ''}"] = res
        log(f"[{rows:,} rows] platform, {n} worker(s){' pinned' if pinned else ''}: "
            f"{res['rows_per_s']:,.0f} rows/s, "
            f"peak RSS {res['peak_rss_mb_all_workers']} MB")
    out["load_after"] = round(os.getloadavg()[0], 2)
    if lib_path.parent == stack.home:
        lib_path.unlink(missing_ok=True)
    return out


LABELS = {"platform_1w": "1 worker", "platform_2w": "2 workers", "platform_1w_1core_each": "1 worker on 1 core",
          "platform_2w_1core_each": "2 workers, 1 core each"}


def summary_rows(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s in sizes:
        n = f"{s['rows']:,} rows"
        bare = s["bare"]["rows_per_s"]
        p1, p2 = s.get("platform_1w"), s.get("platform_2w")
        if p1:
            rows.append(row(f"scoring throughput, 1 worker ({n})", p1["rows_per_s"], bare, unit="rows/s",
                            target="≥ 0.8× bare", met=p1["rows_per_s"] >= 0.8 * bare,
                            note="platform: job wall time incl. gunzip, shard index, merge; bare: 1 process"))
        if p2:
            rows.append(row(f"scoring throughput, 2 workers ({n})", p2["rows_per_s"], bare, unit="rows/s",
                            target="≥ 0.8× bare", met=p2["rows_per_s"] >= 0.8 * bare))
        if p1 and p2:
            rows.append(row(f"1→2 worker scaling, as shipped ({n})", p2["rows_per_s"], p1["rows_per_s"],
                            unit="rows/s", target="–", met=None,
                            note=f"both workers on one {machine_info().get('cores')}-core machine: each one's RDKit "
                                 "pool already uses every core"))
        q1, q2, b1 = s.get("platform_1w_1core_each"), s.get("platform_2w_1core_each"), s.get("bare_1core")
        if q1 and b1:
            rows.append(row(f"scoring throughput, 1 worker on 1 core ({n})", q1["rows_per_s"], b1["rows_per_s"],
                            unit="rows/s", target="≥ 0.8× bare", met=q1["rows_per_s"] >= 0.8 * b1["rows_per_s"],
                            note="worker and bare loop pinned to the same single core: the platform's own cost"))
        if q1 and q2:
            rows.append(row(f"1→2 worker scaling, one core each ({n})", q2["rows_per_s"], q1["rows_per_s"],
                            unit="rows/s", target="≥ 1.6×", met=q2["rows_per_s"] >= 1.6 * q1["rows_per_s"],
                            note="2 workers pinned to cores 0 and 1 (like two 1-core machines) vs 1 worker on core 0"))
        pairs = (("platform_1w", "bare"), ("platform_2w", "bare"), ("platform_1w_1core_each", "bare_1core"))
        for key, bare_key in pairs:
            if s.get(key) and s.get(bare_key):
                cpu, bare_cpu = s[key]["cpu_seconds"], s[bare_key]["cpu_seconds"]
                rows.append(row(f"CPU seconds per 1,000 rows, {LABELS[key]} ({n})", 1000 * cpu / s["rows"],
                                1000 * bare_cpu / s["rows"], unit="CPU-s", target="≤ 1.25× bare",
                                met=cpu <= 1.25 * bare_cpu,
                                note="user+system time of all worker processes incl. RDKit children; "
                                     "insensitive to other load on a shared VM"))
        for key in ("platform_1w", "platform_2w"):
            if s.get(key):
                rows.append(row(f"peak RSS, {LABELS[key]} + RDKit children ({n})",
                                s[key]["peak_rss_mb_all_workers"], s["bare"]["peak_rss_mb"], unit="MB",
                                target="flat in library size", met=None))
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        for key in ("platform_1w", "platform_2w"):
            if small.get(key) and big.get(key):
                for stat in ("median", "peak"):
                    a = small[key][f"{stat}_rss_mb_worker_main"]
                    b = big[key][f"{stat}_rss_mb_worker_main"]
                    rows.append(row(f"worker main {stat} RSS, {small['rows']:,} → {big['rows']:,} rows "
                                    f"({LABELS[key]})", b, a, unit="MB", target="≤ 1.2×", met=b <= 1.2 * a,
                                    note=f"ratio = {stat} at the larger library / at the smaller"))
    return rows


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.score_library", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=f"100000,{FULL}",
                    help="library sizes to run, comma-separated ('full' = all 1,584,663 MOSES rows)")
    ap.add_argument("--quick", action="store_true", help="one small library (20,000 rows)")
    ap.add_argument("--workers", default=None,
                    help="worker counts to run, comma-separated; 'Np' = N workers pinned to one core each "
                         "(like N one-core machines), also runs the bare loop on one core. "
                         "Default: 1,2,1p,2p for libraries up to 200,000 rows, 1,2 above; --quick: 1,1p,2p")
    ap.add_argument("--shard-rows", type=int, default=10_000,
                    help="rows per shard, the same at every library size so memory compares like with like "
                         "(default 10,000: 10 shards at 100k rows, 159 for the full set)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--bare-threads", type=int, default=1, help="torch threads of the bare loop")
    ap.add_argument("--out", default=str(RESULTS / f"{NAME}.json"))
    args = ap.parse_args(argv)
    sizes = [20_000] if args.quick else [FULL if x.strip() == "full" else min(int(x), FULL)
                                         for x in args.rows.split(",") if x.strip()]
    load = wait_for_quiet(max_load=1.5, max_wait_s=60)
    result: dict[str, Any] = {"benchmark": NAME, "date": now_iso(), "machine": machine_info(), "quick": args.quick,
                              "load_at_start": load, "argv": argv if argv is not None else sys.argv[1:],
                              "model": MODEL, "sizes": []}
    started = time.monotonic()
    for size in sizes:
        shard_rows = args.shard_rows
        workers = args.workers or ("1,1p,2p" if args.quick else "1,2,1p,2p" if size <= 200_000 else "1,2")
        worker_counts = [x.strip() for x in workers.split(",") if x.strip()]
        # one stack per size: a fresh database and broker, the same model trained the same way
        with Stack(f"score{size}", score_shard_rows=shard_rows, score_batch_size=args.batch_size) as stack:
            _, url = stack.web()
            api = Api(url, stack.key)
            trainer = stack.worker("cpu", name="trainer")
            from app.sample_data import solubility_csv

            ds = api.upload("sequences", solubility_csv(stack.home / "solubility.csv"), label_columns="solubility")
            job = api.wait(api.submit("train", {"model_name": "sol", "dataset_id": ds["id"], **MODEL})["id"], 900)
            stack.stop(trainer)
            if job["state"] != "succeeded":
                raise RuntimeError(f"training failed: {job.get('error')}")
            from app.artifacts import ArtifactStore
            from app.models import ModelVersion

            with stack.db.session() as s:
                uri = s.query(ModelVersion.artifact_uri).filter_by(name="sol", version=1).scalar()
            bundle = str(ArtifactStore(stack.settings.artifacts).path(uri))
            result["sizes"].append(bench_size(stack, api, "sol@1", bundle, size, shard_rows, args.batch_size,
                                              args.bare_threads, worker_counts))
        result["rows"] = summary_rows(result["sizes"])
        result["seconds"] = round(time.monotonic() - started, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")  # after every size
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
