"""One chaos run: a seeded workload and fault plan against a deployment, then the oracle, and
the figures (trials, faults per kind, jobs checked, violations, worst recovery per kind)."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tests.chaos.deployment import Deployment, reaper_bound_s
from tests.chaos.faults import KINDS, NETNS_KINDS, RECOVERY_TIMEOUT_S, Injector
from tests.chaos.observe import Observer
from tests.chaos.oracle import Verdict, judge
from tests.chaos.workload import make_workload

DEFAULT_MIXES = 1  # by default: every fault kind alone once, then this many mixes of two
# Kinds whose trials still find a product violation, each proven by a strict xfail test of its
# own (tests/chaos/test_chaos.py); the CI run leaves them out of its random plan until fixed.
KNOWN_VIOLATIONS: dict[str, str] = {}  # none open: pg_terminate's (a fail-over failed running jobs) is fixed
CI_KINDS = tuple(k for k in KINDS if k not in KNOWN_VIOLATIONS)
# Violations found and not fixed yet, whose fault shape the trials leave out meanwhile (reported).
OPEN_FINDINGS: tuple[dict[str, str], ...] = ()
# Violations the trials found and the product fixed, each kept as a regression test (for the figures).
FIXED_VIOLATIONS = (
    {
        "kind": "partition_pg",
        "found_by": "python -m bench.chaos --trials 16 --seed 14 (trial 10, job 43)",
        "what": "a worker cut off from PostgreSQL in the middle of a transaction kept the job row locked for as "
        "long as the partition lasted: the reaper blocked on the lock and the job was not taken over (122 s). "
        "Now a worker's sessions end after an idle-in-transaction timeout (its heartbeat timeout) and the "
        "reaper skips locked rows; partition_pg no longer resets the cut-off worker's connections",
        "test": "tests/integration/test_job_state_machine_pg.py::"
        "test_a_row_locked_by_a_worker_cut_off_mid_transaction_stalls_no_reaping_and_is_released",
    },
    {
        "kind": "pg_terminate",
        "found_by": "seed 2",
        "what": "a fail-over failed the running job it hit (its progress UPDATE met a terminated backend)",
        "test": "tests/chaos/test_chaos.py::test_a_database_failover_under_a_running_job_does_not_fail_it",
    },
    {
        "kind": "full_disk",
        "found_by": "the full-disk trial",
        "what": "a score job failed by a full disk reported its shard's traceback as its error",
        "test": "tests/chaos/test_chaos.py::test_a_job_failed_by_a_full_disk_reports_one_sentence_without_a_traceback",
    },
    {
        "kind": "partition_pg",
        "found_by": "seed 2074446646",
        "what": "an epoch checkpointed by an attempt cut off from PostgreSQL before it reported the epoch was "
        "never reported: the attempt that took over resumed after it",
        "test": "tests/chaos/test_chaos.py::"
        "test_an_epoch_checkpointed_by_an_attempt_cut_off_from_postgres_is_still_reported",
    },
    {
        "kind": "partition_pg",
        "found_by": "its regression test (a cut just before the version's registration)",
        "what": "an attempt cut off from PostgreSQL while it packaged registered the job's model version after the "
        "takeover (the owning attempt adopted it): model registration was not fenced by the attempt",
        "test": "tests/chaos/test_chaos.py::"
        "test_an_attempt_cut_off_while_packaging_registers_no_version_after_the_takeover",
    },
)
SETTLE_S = 150.0  # after the last fault: every accepted job must be terminal by then
STALE_SLACK_S = 5.0  # on top of the reaper's bound: a loaded machine's late heartbeat or reaper tick


def seed_from_env() -> int:
    raw = os.environ.get("MEDMAAS_CHAOS_SEED", "")
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


def trials_from_env(kinds: tuple[str, ...] = KINDS) -> int:
    raw = os.environ.get("MEDMAAS_CHAOS_TRIALS", "")
    return int(raw) if raw else len(kinds) + DEFAULT_MIXES


@dataclass
class ChaosRun:
    seed: int
    trials: int
    plan: list[tuple[str, ...]]
    injector: Injector
    verdict: Verdict
    seconds: float
    workload_retries: int
    online_calls: int = 0  # predict calls answered by an inference worker without a job

    @property
    def violations(self) -> list[str]:
        unrecovered = [
            f"{f.kind} in trial {f.trial}: job {f.job_id} not running again within {RECOVERY_TIMEOUT_S:.0f}s"
            for f in self.injector.injected
            if f.recovery_s is None
        ]
        return self.injector.problems + unrecovered + self.verdict.violations

    def figures(self) -> dict[str, Any]:
        worst: dict[str, float | None] = {}
        for f in self.injector.injected:
            if f.recovery_s is None:
                worst[f.kind] = None  # never recovered: worse than any number
            elif f.kind not in worst or (worst[f.kind] is not None and f.recovery_s > (worst[f.kind] or 0.0)):
                worst[f.kind] = f.recovery_s
        return {
            "seed": self.seed,
            "trials": self.trials,
            "plan": ["+".join(kinds) for kinds in self.plan],
            "faults": dict(Counter(f.kind for f in self.injector.injected)),
            "jobs_checked": self.verdict.jobs_checked,
            "job_states": self.verdict.states,
            "job_kinds": self.verdict.kinds,
            "retried_jobs": self.verdict.retried_jobs,
            "resumed_train_attempts": self.verdict.resumed_train_attempts,
            "submit_retries": self.workload_retries,
            "online_predict_calls": self.online_calls,
            "orphan_predict_jobs": self.verdict.orphan_predict_jobs,
            "violations": self.violations,
            "fixed_violations": list(FIXED_VIOLATIONS),
            "open_findings": list(OPEN_FINDINGS),
            "worst_recovery_s": worst,
            "settle_s": self.verdict.settle_s,
            "seconds": round(self.seconds, 1),
            "injected": [
                {"kind": f.kind, "trial": f.trial, "job": f.job_id, "recovery_s": f.recovery_s, **f.detail}
                for f in self.injector.injected
            ],
        }


def usable_kinds(dep: Deployment, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """kinds, less the partitions where the deployment has no namespaced worker."""
    return kinds if dep.netns is not None else tuple(k for k in kinds if k not in NETNS_KINDS)


def run_chaos(dep: Deployment, seed: int, trials: int, tenants: int = 3, kinds: tuple[str, ...] = KINDS) -> ChaosRun:
    """The trials (plan from the seed: each kind alone, then mixes), then the oracle over every
    job. Partitions are left out where namespaces cannot be made (the reason is printed)."""
    if usable_kinds(dep, kinds) != kinds:
        print(f"chaos: no partition trials: {dep.no_netns}", flush=True)
        kinds = usable_kinds(dep, kinds)
    print(f"chaos: MEDMAAS_CHAOS_SEED={seed} MEDMAAS_CHAOS_TRIALS={trials} kinds={','.join(kinds)}", flush=True)
    started = time.monotonic()
    rng = random.Random(seed)
    workload = make_workload(dep.app, dep.settings, rng, tenants, client=dep.client)
    observer = Observer(dep.settings.sqlalchemy_url)
    injector = Injector(dep, workload, observer, rng)
    plan = injector.plan(trials, kinds)
    try:
        for trial, kinds in enumerate(plan):
            print(f"chaos: trial {trial}: {' + '.join(kinds)}", flush=True)
            injector.run(trial, kinds)
        verdict = judge(observer, dep.settings, workload, SETTLE_S, STALE_SLACK_S + reaper_bound_s(dep.settings))
    finally:
        injector.close()
        observer.close()
    return ChaosRun(
        seed,
        trials,
        plan,
        injector,
        verdict,
        time.monotonic() - started,
        workload.submit_retries,
        workload.online_calls,
    )
