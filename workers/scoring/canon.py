"""Row checks and RDKit canonicalisation for scoring, optionally in a pool of processes.

RDKit is the slowest step of scoring on CPU (a few thousand molecules per second per
core), so a worker spreads it over child processes, one per core, while its main process
reads, tokenises, runs the model and writes. The children are fresh interpreters
(`python -m workers.scoring.rdkit_child`), not forks: they never inherit CUDA state from a
GPU worker, never re-import the worker's main module, and import nothing but RDKit. They
talk over their stdin/stdout pipes and exit when stdin closes, so a SIGKILLed worker
leaves no orphans. A child that crashes (RDKit segfault) fails only the batch it held and
is restarted for the next one.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import IO, Any

import numpy as np

from workers import metering
from workers.scoring.rdkit_child import check_and_canonicalise, handle

__all__ = ["Canonicalised", "RDKitPool", "canonicalise", "check_and_canonicalise", "get_pool", "shutdown_pool"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_pool_size() -> int:
    """One process per core when there are at least two cores; none on a single core (the
    main process then canonicalises in line; a pool would only add pickling)."""
    cores = available_cores()
    return cores if cores >= 2 else 0


class ChildDied(RuntimeError):
    pass


class _Child:
    """One RDKit child process: a request/reply loop over pipes."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.scoring.rdkit_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        """(stdin, stdout) of the running child, started first if it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None:  # start() opens both pipes
            raise ChildDied("the RDKit child process has no pipes")
        return proc.stdin, proc.stdout

    def call(self, payload: Any) -> Any:
        stdin, stdout = self._pipes()
        data = json.dumps(payload).encode()  # JSON, not pickle: plain lists of strings
        try:
            stdin.write(_HEADER.pack(len(data)) + data)
            stdin.flush()
            head = stdout.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise EOFError
            (size,) = _HEADER.unpack(head)
            reply = stdout.read(size)
            if len(reply) < size:
                raise EOFError
        except (BrokenPipeError, EOFError, OSError) as exc:
            self.stop()
            raise ChildDied(f"the RDKit child process died ({type(exc).__name__})") from None
        return tuple(json.loads(reply))  # (canonical, errors[, packed fingerprints]), as rdkit_child.handle

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RDKitPool:
    """n child processes fed from one queue by n threads (a thread blocks in its child's
    pipe while the child works, so the caller's thread stays free)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._queue: queue.Queue[tuple[Future, Any] | None] = queue.Queue()
        self._children = [_Child() for _ in range(size)]
        self._threads = [
            threading.Thread(target=self._serve, args=(c,), name=f"rdkit-{i}", daemon=True)
            for i, c in enumerate(self._children)
        ]
        for t in self._threads:
            t.start()

    def _serve(self, child: _Child) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                child.stop()
                return
            fut, payload = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                try:
                    reply = child.call(payload)
                except ChildDied:
                    # Killed from outside (the OOM killer, a SIGKILL) or crashed: once more on a
                    # fresh child; an input that crashes RDKit every time fails the second try.
                    reply = child.call(payload)
                fut.set_result(reply)
            except BaseException as exc:
                fut.set_exception(exc)

    def submit(
        self, texts: list[str], validate: str, max_length: int, fingerprint: dict[str, Any] | None = None
    ) -> Future:
        """fingerprint ({"radius", "nbits"}): the reply also holds the packed Morgan bits."""
        fut: Future = Future()
        payload = (texts, validate, max_length) if fingerprint is None else (texts, validate, max_length, fingerprint)
        self._queue.put((fut, payload))
        return fut

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None]

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)


_pool: RDKitPool | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def get_pool(size: int | None = None) -> RDKitPool | None:
    """The process-wide pool (created on first use), or None on a single-core machine."""
    global _pool, _pool_pid
    size = default_pool_size() if size is None else size
    if size < 2:
        return None
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # (a forked child must not share its parent's pipes)
            _pool, _pool_pid = RDKitPool(size), os.getpid()
            log.info("RDKit pool of %d processes", size)
        return _pool


def pool_pids() -> list[int]:
    """The running children of this process's pool (none before it exists or after a fork)."""
    pool = _pool
    return pool.pids() if pool is not None and _pool_pid == os.getpid() else []


metering.count_child_processes(pool_pids)  # their CPU time is the scoring unit's


def shutdown_pool() -> None:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.close()
        _pool, _pool_pid = None, None


atexit.register(shutdown_pool)


class Canonicalised:
    """A batch being canonicalised: in the pool (one chunk per process) or, without a
    pool, in line when result() is called. With `fingerprint` ({"radius", "nbits"}: the
    model has a domain reference) the same processes also compute the packed Morgan bits
    of each canonical SMILES (fingerprints())."""

    def __init__(
        self,
        texts: list[str],
        validate: str,
        max_length: int,
        pool: RDKitPool | None,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self._texts, self._validate, self._max_length = texts, validate, max_length
        self._fingerprint = fingerprint
        self._futures: list[Future] = []
        self._done: list[Any] | None = None
        if pool is not None and validate != "none" and len(texts) > 1:
            step = max(1, -(-len(texts) // pool.size))
            self._futures = [
                pool.submit(texts[i : i + step], validate, max_length, fingerprint) for i in range(0, len(texts), step)
            ]

    def _replies(self) -> list[Any]:
        if self._done is None:
            if self._futures:
                self._done = [fut.result() for fut in self._futures]
            else:
                request = [self._texts, self._validate, self._max_length, self._fingerprint]
                self._done = [handle(request)]
        return self._done

    def result(self) -> tuple[list[str | None], list[str | None]]:
        canon: list[str | None] = []
        errors: list[str | None] = []
        for reply in self._replies():
            canon.extend(reply[0])
            errors.extend(reply[1])
        return canon, errors

    def fingerprints(self) -> np.ndarray | None:
        """uint8 [N, nbits / 8] packed Morgan bits (zero rows where there is no molecule), or
        None when none were asked for."""
        if self._fingerprint is None:
            return None
        width = int(self._fingerprint["nbits"]) // 8
        packed = b"".join(base64.b64decode(reply[2]) for reply in self._replies())
        return np.frombuffer(packed, dtype=np.uint8).reshape(-1, width)

    def cancel(self) -> None:
        for fut in self._futures:
            fut.cancel()


def canonicalise(
    texts: Sequence[str], validate: str = "rdkit", max_length: int = 2000, pool: RDKitPool | None = None
) -> tuple[list[str | None], list[str | None]]:
    return Canonicalised(list(texts), validate, max_length, pool).result()
