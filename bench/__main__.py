"""`python -m bench [--only NAME[,NAME]] [--quick]`: run the benchmarks, write
bench/results/<name>.json and regenerate the results table in bench/README.md.

Every benchmark runs the platform path and a bare baseline in the same run on the same
machine and reports the ratio; absolute times on a shared 2-core VM are noise.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BENCH, RESULTS, log, machine_info, now_iso, wait_for_quiet, write_result

ORDER = ["queue_latency", "api_throughput", "training_overhead", "score_library", "submit_scale", "sse_load",
         "explain_speed", "ensemble_scoring", "onnx_scoring", "drain_rate", "predict_latency"]
# Run only when named with --only (hours of training on 2 cores): model quality on
# FreeSolv and B3DB (bench/model_quality.py); scaling out on an S3 store and worker hosts in
# network namespaces (bench/scale_out.py: root). Their rows are in the table like the others'.
OPTIONAL = ["model_quality", "scale_out"]
README = BENCH / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _module_run(name: str) -> Callable[[bool], dict[str, Any]]:
    module = importlib.import_module(f"bench.{name}")
    return lambda quick: module.run(quick=quick)


def run_score_library(quick: bool, results_dir: Path = RESULTS) -> dict[str, Any] | None:
    """bench/score_library.py belongs to the scoring benchmark; call its main(argv) if it is
    there and fold what it reports into the common result shape."""
    if importlib.util.find_spec("bench.score_library") is None:
        return None
    module = importlib.import_module("bench.score_library")
    path = results_dir / "score_library.json"
    before = path.stat().st_mtime if path.exists() else None
    # bounded for the suite (< 20 min in all): 50,000 MOSES rows; `python -m bench.score_library`
    # alone runs its own default sizes (100,000 and the full 1,584,663 rows)
    argv = (["--quick"] if quick else ["--rows", "50000"]) + ["--out", str(path)]
    returned = module.main(argv)
    data: Any = returned if isinstance(returned, dict) else None
    if data is None and path.exists() and path.stat().st_mtime != before:
        data = json.loads(path.read_text())
    if data is None:
        raise RuntimeError("bench.score_library.main() returned nothing and wrote no bench/results/score_library.json")
    out = dict(data)
    out.setdefault("benchmark", "score_library")
    out.setdefault("date", now_iso())
    out.setdefault("machine", machine_info())
    out.setdefault("quick", quick)
    if not isinstance(out.get("rows"), list):
        out["rows"] = _rows_from_score(data)
    return out


def _rows_from_score(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Best effort for a result without our `rows`: look for platform/bare throughput."""
    def find(d: Any, *names: str) -> Any:
        if isinstance(d, dict):
            for k, v in d.items():
                if k in names and isinstance(v, (int, float)):
                    return v
            for v in d.values():
                got = find(v, *names)
                if got is not None:
                    return got
        return None

    p = find(data, "platform_rows_per_s", "platform_mols_per_s", "platform")
    b = find(data, "bare_rows_per_s", "bare_mols_per_s", "bare")
    ratio = find(data, "ratio")
    if ratio is None and p and b:
        ratio = p / b
    return [{"metric": "library scoring throughput", "unit": "rows/s", "platform": p, "bare": b, "ratio": ratio,
             "target": "≥ 0.8× bare", "met": (ratio >= 0.8) if isinstance(ratio, (int, float)) else None,
             "note": "folded from score_library's own JSON"}]


# --------------------------------------------------------------------------- README table


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
    return str(x)


def table_markdown() -> str:
    results = []
    for name in [*ORDER, *OPTIONAL, "gpu"]:  # gpu.json: from bench/gpu.sh on a GPU machine, copied here
        p = RESULTS / f"{name}.json"
        if p.exists():
            try:
                results.append(json.loads(p.read_text()))
            except ValueError:
                continue
    if not results:
        return "_No results yet: run `python -m bench`._"
    lines = ["| benchmark | metric | platform | bare | ratio | target | met | date | machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.get("machine", {})
        machine = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores" + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
        date = str(r.get("date", ""))[:10] + (" (quick)" if r.get("quick") else "")
        for x in r.get("rows", []):
            unit = f" {x['unit']}" if x.get("unit") else ""
            met = {True: "**yes**", False: "**no**", None: "–"}.get(x.get("met"), str(x.get("met")))
            note = f" ({x['note']})" if x.get("note") else ""
            lines.append(f"| {r.get('benchmark')} | {x['metric']}{note} | {_fmt(x.get('platform'))}{unit} | "
                         f"{_fmt(x.get('bare'))}{unit} | {_fmt(x.get('ratio'))} | {x.get('target', '')} | {met} | "
                         f"{date} | {machine} |")
    for r in results:
        if r.get("error"):
            lines.append(f"\n`{r['benchmark']}` failed on its last run: {r['error'].splitlines()[-1]}")
    return "\n".join(lines)


def update_readme() -> None:
    table = table_markdown()
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n\n## Results\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[],
                    help=f"run only these (comma-separated, repeatable): {', '.join(ORDER + OPTIONAL)}")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (about 4.5 minutes here, plus score_library's own quick mode, about 4)")
    ap.add_argument("--no-wait", action="store_true",
                    help="do not wait (up to 20 s; never with --quick) for the machine's load average to drop "
                         "before each benchmark")
    ap.add_argument("--table", action="store_true", help="only regenerate the README table from bench/results")
    ap.add_argument("--results-dir", type=Path, default=RESULTS,
                    help="write the JSON here instead (the README table is then left alone)")
    args = ap.parse_args(argv)
    if args.table:
        update_readme()
        print(table_markdown())
        return 0
    only = [n.strip() for chunk in args.only for n in chunk.split(",") if n.strip()]
    unknown = set(only) - set(ORDER) - set(OPTIONAL)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {ORDER + OPTIONAL}")
    names = only or ORDER
    failures = 0
    t_all = time.monotonic()
    for name in names:
        if not args.no_wait and not args.quick:
            load = wait_for_quiet(1.0, 20)
            log(f"{name}: 1-minute load average {load}")
        t0 = time.monotonic()
        try:
            if name == "score_library":
                result = run_score_library(args.quick, args.results_dir)
                if result is None:
                    log("score_library: bench/score_library.py is not there; skipped")
                    continue
            else:
                result = _module_run(name)(args.quick)
            result["duration_s"] = round(time.monotonic() - t0, 1)
        except Exception:
            failures += 1
            log(f"{name}: FAILED")
            traceback.print_exc()
            result = {"benchmark": name, "date": now_iso(), "machine": machine_info(), "quick": args.quick,
                      "rows": [], "error": traceback.format_exc()}
        path = write_result(name, result, args.results_dir)
        log(f"{name}: wrote {path} in {time.monotonic() - t0:.0f}s")
        for r in result.get("rows", []):
            met = {True: "met", False: "NOT MET", None: ""}.get(r.get("met"), "")
            log(f"  {r['metric']}: platform {r.get('platform')} / bare {r.get('bare')} = {r.get('ratio')} "
                f"[{r.get('target')}] {met}")
        if args.results_dir.resolve() == RESULTS.resolve():
            update_readme()
    log(f"all done in {time.monotonic() - t_all:.0f}s; table in bench/README.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
