"""Scaling out (issue 16): library scoring with the artifacts in an S3 object store against a
local directory, and on one then two worker hosts.

The same MOSES library (gzip CSV, header SMILES; molsets' 1,584,663 training molecules or
their first N) is scored by the same model (score_library's GRU, embedding 48, hidden 96,
trained for 2 epochs on the solubility set through the API, once per stack) on fresh stacks
(bench/common.py: a private Redis and PostgreSQL database, `medmaas web`):

- local: one `medmaas worker` on this machine, artifacts in the local directory (file://);
- s3: one `medmaas worker` on this machine with MEDMAAS_ARTIFACT_STORE=s3://... on moto's S3
  server (`moto_server`, its own process on loopback): the library, the model bundle and
  every shard's part travel through the bucket, the worker's directory is only its cache;
- hosts: 1, then 2 worker hosts (tests/hosts.py: network namespaces with a hostname of their
  own and an empty private tmpfs each, no shared filesystem, reaching PostgreSQL, Redis and
  the S3 endpoint through TCP forwarders on their veth links), the same S3 store. The hosts
  share this machine's cores, so rows/s cannot double here: CPU-seconds per 1,000 rows (the
  hosts' worker processes and their RDKit children) is the steady figure. The forwarders
  are threads of this process; their CPU time is reported apart.

Throughput is rows / (job started_at -> finished_at): decompressing the library, indexing the
shards, scoring and the ordered merge. Runs are sequential. The hosts need root (namespaces);
without it that part is left out and the JSON says why.

    python -m bench.scale_out --quick            # 100,000 rows (what `--only scale_out --quick` runs)
    python -m bench.scale_out                    # all 1,584,663 rows
    python -m bench.scale_out --rows 20000 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    RESULTS,
    Api,
    Stack,
    free_port,
    log,
    machine_info,
    now_iso,
    row,
    stop_process,
    wait_for_port,
    write_and_print,
)
from bench.score_library import FULL, MODEL, RssSampler, library_file, start_worker

NAME = "scale_out"
QUICK_ROWS = 100_000
SHARD_ROWS = 10_000  # as score_library: 10 shards at 100k rows, 159 for the full set
BATCH = 4096


# --------------------------------------------------------------------------- the S3 endpoint


@contextlib.contextmanager
def s3_server(work: Path) -> Iterator[str]:
    """moto's S3 server in a process of its own on a free loopback port; the AWS credentials
    it accepts are set in this process's environment (the stack's processes inherit them)."""
    from tests.s3 import CREDENTIALS

    os.environ.update(CREDENTIALS)
    port = free_port()
    logf = open(work / "moto.log", "wb")  # noqa: SIM115 (the child's)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=logf,
        stderr=subprocess.STDOUT,
    )
    logf.close()
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- one scoring run


def train_model(stack: Stack, api: Api) -> str:
    from app.sample_data import solubility_csv

    trainer = stack.worker("cpu", name="trainer")
    try:
        ds = api.upload("sequences", solubility_csv(stack.home / "solubility.csv"), label_columns="solubility")
        job = api.wait(api.submit("train", {"model_name": "sol", "dataset_id": ds["id"], **MODEL})["id"], 1800)
    finally:
        stack.stop(trainer)
    if job["state"] != "succeeded":
        raise RuntimeError(f"training failed: {job.get('error')}")
    return "sol@1"


def score(api: Api, model: str, library_id: int, rows: int, pids: list[int]) -> dict[str, Any]:
    """One score job while the processes `pids` (and their children) are the only workers."""
    me = psutil.Process()
    own_before = sum(me.cpu_times()[:2])
    with RssSampler(pids) as rss:
        job = api.submit("score", {"model": model, "library_id": library_id, "output": "csv", "top_k": 100})
        done = api.wait(job["id"], timeout=6 * 3600, interval=2.0)
    own = sum(me.cpu_times()[:2]) - own_before
    if done["state"] != "succeeded":
        raise RuntimeError(f"score job {done['id']} {done['state']}: {done.get('error')}")
    res = done["result"]
    assert res["rows"] == rows, (res["rows"], rows)
    job_s = (datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])).total_seconds()
    cpu = rss.to_dict()["cpu_seconds"]
    return {
        "job_id": done["id"],
        "rows": rows,
        "job_seconds": round(job_s, 3),
        "rows_per_s": round(rows / job_s, 1),
        "cpu_seconds": cpu,
        "cpu_s_per_1000_rows": round(1000 * cpu / rows, 4),
        "this_process_cpu_seconds": round(own, 2),  # the forwarders of the hosts, the API client
        "scoring_seconds": res["scoring_seconds"],
        "merge_seconds": res["merge_seconds"],
        "shards": res["shards"],
        "load_after": round(os.getloadavg()[0], 2),
        **{k: v for k, v in rss.to_dict().items() if k.startswith("peak_rss")},
    }


def one_worker(stack: Stack, api: Api, model: str, library_id: int, rows: int, label: str) -> dict[str, Any]:
    worker = start_worker(stack, f"{label}-worker", None)
    try:
        return score(api, model, library_id, rows, [worker.pid])
    finally:
        stack.stop(worker)


def on_hosts(stack: Stack, api: Api, model: str, library_id: int, rows: int, labels: list[str]) -> dict[str, Any]:
    from tests import hosts

    work = stack.home / f"hosts-{len(labels)}"
    work.mkdir()
    with hosts.worker_hosts(labels, stack.settings, work, env={"PYTHONUNBUFFERED": "1"}) as started:
        out = score(api, model, library_id, rows, [h.pid for h in started])
        out["hosts"] = [h.worker_name for h in started]
        return out


# --------------------------------------------------------------------------- main


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    n = f"{res['library_rows']:,} rows"
    out = []
    local, s3 = res.get("local"), res.get("s3")
    if local and s3:
        out.append(
            row(
                f"scoring throughput, artifacts on S3 vs local directory, 1 worker ({n})",
                s3["rows_per_s"],
                local["rows_per_s"],
                unit="rows/s",
                target="≥ 0.8×",
                met=s3["rows_per_s"] >= 0.8 * local["rows_per_s"],
                note="platform: MEDMAAS_ARTIFACT_STORE=s3:// on moto's server; bare: the same job, file://",
            )
        )
        out.append(
            row(
                f"CPU seconds per 1,000 rows, S3 vs local directory ({n})",
                s3["cpu_s_per_1000_rows"],
                local["cpu_s_per_1000_rows"],
                unit="CPU-s",
                target="≤ 1.25×",
                met=s3["cpu_s_per_1000_rows"] <= 1.25 * local["cpu_s_per_1000_rows"],
                note="worker and RDKit children; the S3 server's own CPU not included",
            )
        )
    one, two = res.get("hosts_1"), res.get("hosts_2")
    if one and two:
        out.append(
            row(
                f"CPU seconds per 1,000 rows, 2 worker hosts vs 1 ({n})",
                two["cpu_s_per_1000_rows"],
                one["cpu_s_per_1000_rows"],
                unit="CPU-s",
                target="≤ 1.15×",
                met=two["cpu_s_per_1000_rows"] <= 1.15 * one["cpu_s_per_1000_rows"],
                note="network namespaces, no shared filesystem, S3 store; the steady figure: both share 2 cores",
            )
        )
        out.append(
            row(
                f"scoring throughput, 2 worker hosts vs 1 ({n})",
                two["rows_per_s"],
                one["rows_per_s"],
                unit="rows/s",
                target="–",
                met=None,
                note=f"both hosts on one {machine_info().get('cores')}-core machine: not a scaling figure",
            )
        )
    return out


def run(quick: bool = False, rows: int | None = None, parts: str = "local,s3,hosts") -> dict[str, Any]:
    from tests import hosts

    size = min(rows or (QUICK_ROWS if quick else FULL), FULL)
    wanted = {p.strip() for p in parts.split(",") if p.strip()}
    result: dict[str, Any] = {
        "benchmark": NAME,
        "date": now_iso(),
        "machine": machine_info(),
        "quick": quick,
        "library_rows": size,
        "shard_rows": SHARD_ROWS,
        "model": MODEL,
    }
    started = time.monotonic()
    settings = {"score_shard_rows": SHARD_ROWS, "score_batch_size": BATCH}
    if "local" in wanted:
        with Stack("scale-local", **settings) as stack:
            _, url = stack.web()
            api = Api(url, stack.key)
            model = train_model(stack, api)
            lib = api.upload("library", library_file(size, stack.home))
            result["local"] = one_worker(stack, api, model, lib["id"], size, "local")
            log(f"{NAME}: local directory, 1 worker: {result['local']['rows_per_s']:,.0f} rows/s")
    if wanted & {"s3", "hosts"}:
        with contextlib.ExitStack() as stack_of:
            from tests.s3 import make_bucket

            endpoint = stack_of.enter_context(s3_server(Path(tempfile.mkdtemp(prefix="medmaas-bench-s3-"))))
            store = f"s3://{make_bucket(endpoint)}/artifacts"
            stack = stack_of.enter_context(
                Stack("scale-s3", artifact_store=store, s3_endpoint_url=endpoint, **settings)
            )
            _, url = stack.web()
            api = Api(url, stack.key)
            model = train_model(stack, api)
            lib = api.upload("library", library_file(size, stack.home))
            if "s3" in wanted:
                result["s3"] = one_worker(stack, api, model, lib["id"], size, "s3")
                log(f"{NAME}: S3 store, 1 worker: {result['s3']['rows_per_s']:,.0f} rows/s")
            if "hosts" in wanted:
                why = hosts.unavailable()
                if why is not None:
                    result["hosts_left_out"] = why
                    log(f"{NAME}: no worker hosts here: {why}")
                else:
                    for labels in (["a"], ["a", "b"]):
                        res = on_hosts(stack, api, model, lib["id"], size, labels)
                        result[f"hosts_{len(labels)}"] = res
                        log(
                            f"{NAME}: {len(labels)} worker host(s): {res['rows_per_s']:,.0f} rows/s, "
                            f"{res['cpu_s_per_1000_rows']} CPU-s per 1,000 rows"
                        )
    result["seconds"] = round(time.monotonic() - started, 1)
    result["rows"] = summary_rows(result)  # the table's rows
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.scale_out", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help=f"the first {QUICK_ROWS:,} rows")
    ap.add_argument("--rows", type=int, help=f"library rows (default: all {FULL:,})")
    ap.add_argument("--parts", default="local,s3,hosts", help="which set-ups to run (default: all three)")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    args = ap.parse_args(argv)
    result = run(args.quick, args.rows, args.parts)
    write_and_print(result, args.out)
    return result


if __name__ == "__main__":
    main()
