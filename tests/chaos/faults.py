"""The fault injector: each trial picks a fault kind and its moment from the seeded RNG,
injects it under load, and measures the recovery (from the fault to the job it hit, or a
probe job submitted after it, running again).

Kinds:
    worker_sigkill  SIGKILL of the worker process group holding a train or score job, 1-3
                    times in a row on the same job: a train job just after each new epoch's
                    checkpoint (plus jitter), a score job after a random number of its events
    worker_sigterm  SIGTERM (Celery's warm shutdown) of the worker holding a job
    beat_sigterm    SIGTERM of `medmaas beat` (it must exit within BEAT_EXIT_S), restarted after
                    a random pause; a job whose broker message is missing (submitted while the
                    web tier could not reach Redis) must run once beat is back
    redis_restart   Redis shut down cleanly and started again on the same port (not flushed)
    pg_terminate    pg_terminate_backend of every connection to the deployment's database
    partition_pg    the namespaced worker (tests/netns.py) holding a job loses PostgreSQL (its
                    forwarder goes silent; the connections it had open are reset, so the
                    server rolls back its open transaction) until its lease expired and the
                    other worker took the job over, then gets it back: the stale attempt keeps
                    running meanwhile and its late writes (progress, events, checkpoints, score
                    parts, its model version, its outcome) must be fenced out by the attempt
    partition_link  the namespaced worker's link is cut (PostgreSQL and Redis both silent) for
                    1 s to twice the heartbeat timeout, then restored: the job continues or is
                    taken over, and the worker consumes from Redis again afterwards

The first len(KINDS) trials run each kind alone; later trials mix two kinds at once.
Recovery includes the time a process was deliberately kept down (down_s).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from app.models import JobState
from medmaas.standalone import free_port
from tests.chaos.deployment import Deployment, Managed, reaper_bound_s
from tests.chaos.observe import JobView, Observer
from tests.chaos.workload import Accepted, Workload
from tests.conftest import ApiClient

KINDS = (
    "worker_sigkill",
    "worker_sigterm",
    "beat_sigterm",
    "redis_restart",
    "pg_terminate",
    "partition_pg",
    "partition_link",
)
NETNS_KINDS = ("partition_pg", "partition_link")  # need the namespaced worker (root, iproute2)
RECOVERY_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0
BEAT_EXIT_S = 5.0  # beat's loop waits reaper_interval_s between ticks: SIGTERM must end it quickly


def is_running(view: JobView) -> bool:
    return view.state == JobState.running


@dataclass
class Injected:
    """One fault as injected: its kind, the job it hit, when, and how long recovery took."""

    kind: str
    trial: int
    job_id: int | None
    detail: dict[str, Any] = field(default_factory=dict)
    recovery_s: float | None = None  # None: never recovered within RECOVERY_TIMEOUT_S


class Injector:
    def __init__(self, dep: Deployment, workload: Workload, observer: Observer, rng: random.Random) -> None:
        self.dep, self.workload, self.observer, self.rng = dep, workload, observer, rng
        self.injected: list[Injected] = []
        self.problems: list[str] = []  # faults that misbehaved themselves (a group that survived a SIGKILL)
        self._unpublished_app: Any = None
        self._processes = threading.Lock()  # one kill-and-restart of a process at a time

    def plan(self, trials: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, ...]]:
        """Every kind alone once (in a seeded order), then random mixes of two kinds at once."""
        alone = [(k,) for k in kinds]
        self.rng.shuffle(alone)
        mixes = [tuple(self.rng.sample(kinds, min(2, len(kinds)))) for _ in range(max(0, trials - len(kinds)))]
        return (alone + mixes)[:trials]

    def run(self, trial: int, kinds: tuple[str, ...]) -> None:
        """One trial: background load, then its faults (a mix runs each in a thread of its own,
        each with its own seeded RNG, so the choices replay whatever the timing)."""
        self.workload.mixed(self.rng.randint(1, 3))
        rngs = [random.Random(self.rng.random()) for _ in kinds]
        stagger = [self.rng.uniform(0.0, 1.0) for _ in kinds]  # drawn here: each thread owns its rng
        if len(kinds) == 1:
            getattr(self, kinds[0])(trial, rngs[0])
            return
        errors: list[BaseException] = []

        def inject(kind: str, rng: random.Random) -> None:
            try:
                getattr(self, kind)(trial, rng)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=inject, args=(k, r)) for k, r in zip(kinds, rngs, strict=True)]
        for t, pause in zip(threads, stagger, strict=True):
            t.start()
            time.sleep(pause)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    # -- helpers ----------------------------------------------------------------------------
    def _recover(self, fault: Injected, started: float, job_id: int, after_seq: int) -> None:
        deadline = started + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.observer.running_again_after(job_id, after_seq):
                fault.recovery_s = round(time.monotonic() - started, 3)
                return
            time.sleep(0.05)
        self._note_stuck(fault, job_id)

    def _note_stuck(self, fault: Injected, job_id: int) -> None:
        """What a job that did not recover looked like, and who was there to run it."""
        view = self.observer.job(job_id)
        fault.detail["stuck"] = {
            "state": view.state.value,
            "attempts": view.attempts,
            "worker": view.worker,
            "events": [(e.seq, e.type, e.data.get("to")) for e in self.observer.events(job_id)][-8:],
            "our_workers": [w.pid for w in self.dep.workers if w.alive()],
            "announced": sorted(self.dep.live_worker_names()),
        }

    def _probe_running(self, fault: Injected, started: float, probe: Accepted) -> None:
        view = self.observer.wait_job(
            probe.id, lambda v: v.state != JobState.queued, RECOVERY_TIMEOUT_S - (time.monotonic() - started)
        )
        if view is not None:
            fault.recovery_s = round(time.monotonic() - started, 3)
        else:
            self._note_stuck(fault, probe.id)

    def _holder(self, job: Accepted, timeout: float = START_TIMEOUT_S) -> tuple[JobView, Managed] | None:
        """Wait until the job runs on one of our live workers: (its view, that worker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.observer.job(job.id)
            if view.terminal:
                return None
            if is_running(view) and view.worker_pid is not None:
                worker = self.dep.worker_by_pid(view.worker_pid)
                if worker is not None:
                    return view, worker
            time.sleep(0.02)
        return None

    def _random_moment(self, job: Accepted, rng: random.Random, most: int = 4) -> tuple[JobView, Managed] | None:
        """A random point of the job's current attempt: after 0..most more of its events
        (progress, metrics: epochs of a train job, shards of a score job) and a jitter of up to
        0.3 s. Returns the holder then, or None once the job has ended."""
        held = self._holder(job)
        if held is None:
            return None
        more = rng.randint(0, most)
        jitter = rng.uniform(0.0, 0.3)
        target = held[0].event_seq + more
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            view = self.observer.job(job.id)
            if view.terminal or view.event_seq >= target or view.attempts != held[0].attempts:
                break
            time.sleep(0.02)
        time.sleep(jitter)
        return self._holder(job, timeout=5.0)

    def _after_next_epoch(self, job: Accepted, rng: random.Random) -> tuple[JobView, Managed] | None:
        """A point of a train job's current attempt just after it reported (and so had
        checkpointed) one more epoch than the job had so far, plus a jitter of up to 0.5 s: a
        kill there leaves a checkpoint the next attempt must resume from. None once it ended."""
        held = self._holder(job)
        if held is None:
            return None
        reported = [int(e.data["epoch"]) for e in self.observer.events(job.id) if e.type == "metric"]
        target = max(reported, default=0) + 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            events = self.observer.events(job.id, held[0].event_seq)
            if any(e.type == "metric" and int(e.data.get("epoch", 0)) >= target for e in events):
                break
            if self.observer.job(job.id).terminal:
                return None
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        return self._holder(job, timeout=5.0)

    def _still_holds(self, job: Accepted, view: JobView, worker: Managed) -> bool:
        """Whether `worker` still runs the job's attempt `view` saw (a mix's other fault may
        have restarted it, or the job ended meanwhile)."""
        now = self.observer.job(job.id)
        return is_running(now) and now.attempts == view.attempts and worker.pid == view.worker_pid

    # -- the faults ---------------------------------------------------------------------------
    def worker_sigkill(self, trial: int, rng: random.Random) -> None:
        kills = rng.randint(1, 3)
        train = rng.random() < 0.6
        job = self.workload.train(rng, epochs=kills + 1) if train else self.workload.score(rng)
        for n in range(kills):
            # a train job is killed just after a checkpoint (a resume to prove), a score job anywhere
            held = self._after_next_epoch(job, rng) if train else self._random_moment(job, rng, 4 if n == 0 else 2)
            if held is None:
                break  # it finished before this kill
            view, worker = held
            fault = Injected("worker_sigkill", trial, job.id, {"job_kind": job.kind, "kill": n + 1, "of": kills})
            with self._processes:
                if not self._still_holds(job, view, worker):
                    continue  # while another fault of a mix held the lock, the job ended or moved
                worker.signal_group(signal.SIGKILL)
                started = time.monotonic()
                worker.wait(30)
                time.sleep(0.2)
                if worker.group_alive():
                    self.problems.append(f"worker group {worker.pid} survived SIGKILL (trial {trial})")
                after = self.observer.job(job.id).event_seq
                fault.detail["attempt"] = view.attempts
                self.injected.append(fault)
                worker.start()  # the slot is refilled, as a supervisor would
            self._recover(fault, started, job.id, after)

    def worker_sigterm(self, trial: int, rng: random.Random) -> None:
        job = rng.choice([self.workload.sleep, self.workload.train, self.workload.score])(rng)
        held = self._random_moment(job, rng)
        if held is None:
            return
        view, worker = held
        with self._processes:
            if not self._still_holds(job, view, worker):
                return
            after = view.event_seq
            fault = Injected("worker_sigterm", trial, job.id, {"job_kind": job.kind, "attempt": view.attempts})
            worker.signal(signal.SIGTERM)
            started = time.monotonic()
            self.injected.append(fault)
            self._recover(fault, started, job.id, after)
            code = worker.wait(RECOVERY_TIMEOUT_S)
            fault.detail["exit_code"] = code
            fault.detail["exit_s"] = round(time.monotonic() - started, 3)
            if code is None:
                self.problems.append(f"worker {worker.pid} still running {RECOVERY_TIMEOUT_S}s after SIGTERM")
            worker.signal_group(signal.SIGKILL)  # what a supervisor does to a stopped worker's leftovers
            worker.wait(30)
            worker.start()

    def beat_sigterm(self, trial: int, rng: random.Random) -> None:
        beat = self.dep.beat
        assert beat is not None
        down_s = round(rng.uniform(0.5, 3.0), 2)
        fault = Injected("beat_sigterm", trial, None, {"down_s": down_s})
        beat.signal(signal.SIGTERM)
        started = time.monotonic()
        code = beat.wait(BEAT_EXIT_S)
        fault.detail["exit_code"] = code
        if code is None:
            self.problems.append(f"beat did not exit within {BEAT_EXIT_S}s of SIGTERM (trial {trial})")
            beat.signal_group(signal.SIGKILL)
            beat.wait(10)
        probe = self.unpublished_submit(rng)
        fault.job_id = probe.id
        self.injected.append(fault)
        time.sleep(max(0.0, down_s - (time.monotonic() - started)))
        beat.start()
        self._probe_running(fault, started, probe)

    def redis_restart(self, trial: int, rng: random.Random) -> None:
        running = self.workload.sleep(rng, seconds=3.0)
        self._holder(running)
        down_s = round(rng.uniform(0.5, 3.0), 2)
        fault = Injected("redis_restart", trial, None, {"down_s": down_s, "running_job": running.id})
        started = time.monotonic()
        self.dep.redis.restart(down_s)
        probe = self.workload.sleep(rng, seconds=0.5)
        fault.job_id = probe.id
        self.injected.append(fault)
        self._probe_running(fault, started, probe)

    def pg_terminate(self, trial: int, rng: random.Random) -> None:
        job = rng.choice([self.workload.sleep, self.workload.train, self.workload.score])(rng)
        held = self._random_moment(job, rng)
        fault = Injected("pg_terminate", trial, job.id, {"job_kind": job.kind})
        after = self.observer.job(job.id).event_seq
        started = time.monotonic()
        fault.detail["backends"] = self.dep.terminate_backends()
        fault.detail["job_was_running"] = held is not None
        self.injected.append(fault)
        if held is not None:
            self._recover(fault, started, job.id, after)
        else:
            probe = self.workload.sleep(rng, seconds=0.5)
            fault.job_id = probe.id
            self._probe_running(fault, started, probe)

    # -- partitions of the namespaced worker -------------------------------------------------------
    def _on_partitionable(self, rng: random.Random) -> tuple[Accepted, JobView, Managed] | None:
        """A job (a long sleep or a train job) running on the namespaced worker: submit until
        one lands there (while the other worker is busy with the previous one)."""
        target = self.dep.partitionable
        assert target is not None, f"no namespaced worker: {self.dep.no_netns}"
        for _ in range(4):
            if rng.random() < 0.5:
                job = self.workload.sleep(rng, seconds=round(rng.uniform(8.0, 14.0), 2))
            else:
                job = self.workload.train(rng, epochs=3)
            held = self._random_moment(job, rng, most=3)
            if held is not None and held[1] is target:
                return job, *held
        return None

    def _stale_dropped(self, worker: Managed, job_id: int, attempt: int, timeout: float) -> float | None:
        """Seconds until the worker's log says it gave the stale attempt up (taken over, or its
        connection lost and the attempt given back), None if it did not within timeout."""
        started = time.monotonic()
        marks = (f"job {job_id} attempt {attempt} was taken over", f"job {job_id} attempt {attempt}: the database")
        while time.monotonic() - started < timeout:
            if any(mark in worker.log_tail(200_000) for mark in marks):
                return round(time.monotonic() - started, 3)
            time.sleep(0.25)
        return None

    def _consumes_again(self, fault: Injected, worker: Managed, rng: random.Random) -> None:
        """After a partition: the worker takes a job again (it did not silently stop consuming).
        Sleep probes are submitted until one runs on it (the other worker takes some)."""
        started = time.monotonic()
        deadline = started + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            probe = self.workload.sleep(rng, seconds=1.5)
            held = self._holder(probe, timeout=max(1.0, deadline - time.monotonic()))
            if held is not None and held[1] is worker:
                fault.detail["consuming_again_s"] = round(time.monotonic() - started, 3)
                return
            if not worker.alive():
                break
        self.problems.append(
            f"{fault.kind} in trial {fault.trial}: worker {worker.pid} took no job within "
            f"{RECOVERY_TIMEOUT_S:.0f}s after the partition ended"
        )

    def partition_pg(self, trial: int, rng: random.Random) -> None:
        """The namespaced worker loses PostgreSQL past its lease: the job is taken over, and the
        stale attempt's writes after the partition are fenced out."""
        found = self._on_partitionable(rng)
        if found is None:
            return
        job, view, worker = found
        with self._processes:
            if not self._still_holds(job, view, worker):
                return
            extra_s = round(rng.uniform(0.0, 2.0), 2)  # the partition lasts this long past the takeover
            fault = Injected("partition_pg", trial, job.id, {"job_kind": job.kind, "attempt": view.attempts})
            after = view.event_seq
            fault.detail["reset"] = self.dep.cut_from_postgres()
            started = time.monotonic()
            self.injected.append(fault)
            try:
                # the lease expires (heartbeat timeout), the reaper re-queues, the other worker claims
                taken = self.observer.wait_job(
                    job.id, lambda v: v.attempts > view.attempts or v.terminal, RECOVERY_TIMEOUT_S
                )
                self._recover(fault, started, job.id, after)
                time.sleep(extra_s)
            finally:
                self.dep.heal_postgres()
            fault.detail["held_s"] = round(time.monotonic() - started, 3)
            fault.detail["lease_bound_s"] = reaper_bound_s(self.dep.settings)
            if taken is None or taken.worker_pid == worker.pid:
                fault.detail["taken_over"] = False
                self.problems.append(f"partition_pg in trial {trial}: job {job.id} was not taken over")
                return
            fault.detail["taken_over"] = True
            # the stale attempt runs on until its next write meets the fence (or its lost lease)
            dropped = self._stale_dropped(worker, job.id, view.attempts, RECOVERY_TIMEOUT_S)
            fault.detail["stale_dropped_s"] = dropped
            if dropped is None:
                self.problems.append(
                    f"partition_pg in trial {trial}: worker {worker.pid} did not drop stale attempt "
                    f"{view.attempts} of job {job.id} within {RECOVERY_TIMEOUT_S:.0f}s of the partition's end"
                )

    def partition_link(self, trial: int, rng: random.Random) -> None:
        """The namespaced worker's link goes down (both services silent) and comes back."""
        found = self._on_partitionable(rng)
        if found is None:
            return
        job, view, worker = found
        ns = self.dep.netns
        assert ns is not None
        with self._processes:
            if not self._still_holds(job, view, worker):
                return
            cut_s = round(rng.uniform(1.0, 2 * self.dep.settings.heartbeat_timeout_s), 2)
            fault = Injected("partition_link", trial, job.id, {"job_kind": job.kind, "cut_s": cut_s})
            after = view.event_seq
            ns.cut()
            started = time.monotonic()
            self.injected.append(fault)
            try:
                time.sleep(cut_s)
            finally:
                ns.restore()
            self._recover(fault, started, job.id, after)
            fault.detail["taken_over"] = self.observer.job(job.id).attempts > view.attempts
            self._consumes_again(fault, worker, rng)

    # -- a job the broker never got ------------------------------------------------------------
    def unpublished_submit(self, rng: random.Random) -> Accepted:
        """Submit through a second web app whose broker URL points at a closed port: the job is
        committed (202) but never published, so only beat's reconciler can start it."""
        if self._unpublished_app is None:
            from app import create_app

            self._unpublished_app = create_app(
                self.dep.settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0")
            )
        tenant = self.workload.tenant(rng)
        offline = replace(tenant, api=ApiClient(self._unpublished_app.test_client(), tenant.api.key))
        return self.workload.submit(offline, "sleep", {"seconds": 0.5, "steps": 2})

    def close(self) -> None:
        if self._unpublished_app is not None:
            from tests.conftest import close_app

            close_app(self._unpublished_app)
