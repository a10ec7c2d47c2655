"""Chaos figures: the harness of tests/chaos (a real deployment, a seeded workload, injected
faults, the exactly-once oracle) run with as many trials as asked, its figures written to
bench/results/chaos.json: seed, trials, faults per kind, jobs checked, violations and the
worst recovery time per fault kind (from the fault to the job it hit, or a probe job, running
again).

    python -m bench.chaos --trials 20 [--seed 7] [--tenants 3]

Exit status 1 when the oracle found a violation (the figures are written either way)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, machine_info, now_iso, write_result

NAME = "chaos"


def main(argv: list[str] | None = None) -> int:
    from tests.chaos.deployment import deployment
    from tests.chaos.faults import KINDS
    from tests.chaos.trials import run_chaos, seed_from_env, trials_from_env

    ap = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--trials",
        type=int,
        default=None,
        help="default: MEDMAAS_CHAOS_TRIALS, else each kind alone once and one mix",
    )
    ap.add_argument("--seed", type=int, default=None, help="default: MEDMAAS_CHAOS_SEED, else random (printed)")
    ap.add_argument("--tenants", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated fault kinds (default: all of {KINDS})")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        ap.error(f"unknown fault kinds {sorted(unknown)}; choose from {KINDS}")
    seed = args.seed if args.seed is not None else seed_from_env()
    trials = args.trials if args.trials is not None else trials_from_env(kinds)
    work = Path(tempfile.mkdtemp(prefix="medmaas-chaos-"))
    with deployment(work) as dep:
        run = run_chaos(dep, seed, trials, tenants=args.tenants, kinds=kinds)
        figures = {"benchmark": NAME, "when": now_iso(), "machine": machine_info(), **run.figures()}
    if run.violations:
        print(f"process logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    path = write_result(NAME, figures, args.results_dir)
    print(
        f"seed {run.seed}: {trials} trials, faults {figures['faults']}, {figures['jobs_checked']} jobs checked, "
        f"{len(run.violations)} violations, worst recovery {figures['worst_recovery_s']}; wrote {path}"
    )
    for violation in run.violations:
        print(f"VIOLATION {violation}")
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
