"""Taking calls off a queue's Redis list and answering them (the protocol is described in
app/inference.py): `take` marks each popped call held by this consumer (SET NX, so a call
its caller already gave up is dropped), `answer` moves each call to "answered" (SET XX
GET) and pushes its reply, and returns the calls this consumer still held: only those are
recorded. A sequential call costs the consumer two round trips besides its blocking pop."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from app import inference
from workers.inference.batcher import Call, parse_call

log = logging.getLogger(__name__)

POP_COUNT = 64  # messages per LPOP while a batch fills


class CallSource:
    """Pops batches of calls from one inference queue for one consumer."""

    def __init__(self, client: Any, queue: str, consumer: str, window_s: float, max_inputs: int) -> None:
        self.client, self.queue, self.consumer = client, queue, consumer
        self.key = inference.requests_key(queue)
        self.window_s, self.max_inputs = window_s, max_inputs
        self._last_calls = 0

    def next_calls(self, block_s: float) -> list[Call]:
        """The calls that arrived together: block up to block_s for the first one, then take
        what is already waiting and, when calls come concurrently (the previous batch held
        more than one, or more were waiting), wait up to the window for more, until
        max_inputs. A lone sequential caller never waits for the window: it costs the
        blocking pop and one round trip (its hold and the look for more, pipelined)."""
        first = self.client.blpop([self.key], timeout=block_s)
        if first is None:
            return []
        now = time.time()
        calls = [c for c in self._parse([first[1]]) if c.deadline > now]
        pipe = self.client.pipeline(transaction=False)
        self._hold(pipe, calls, now)
        pipe.lpop(self.key, POP_COUNT)
        *held, more = pipe.execute()
        taken = [c for c, ok in zip(calls, held, strict=True) if ok]
        pending: list[Call] = self._parse(more or [])
        started = time.monotonic()
        waited = self._last_calls > 1 or bool(pending)
        size = sum(len(c.spec["inputs"]) for c in [*taken, *pending])
        while size < self.max_inputs:
            more = self.client.lpop(self.key, POP_COUNT)
            if not more:
                left = self.window_s - (time.monotonic() - started)
                if not waited or left <= 0:
                    break
                item = self.client.blpop([self.key], timeout=max(0.001, left))
                if item is None:
                    break
                more = [item[1]]
            parsed = self._parse(more)
            pending += parsed
            size += sum(len(c.spec["inputs"]) for c in parsed)
        taken += self.take(pending)
        self._last_calls = len(taken)
        return taken

    def _parse(self, raw: Sequence[bytes]) -> list[Call]:
        calls = []
        for item in raw:
            call = parse_call(item)
            if call is None:
                log.warning("dropping a malformed message on %s", self.key)
            else:
                calls.append(call)
        return calls

    def _hold(self, pipe: Any, calls: Sequence[Call], now: float) -> None:
        for c in calls:
            ttl_ms = int((c.deadline - now + inference.STATE_TTL_S) * 1000)
            pipe.set(inference.state_key(c.id), inference.HELD + self.consumer, nx=True, px=ttl_ms)

    def take(self, calls: Sequence[Call]) -> list[Call]:
        """Mark popped calls held by this consumer; those whose caller gave up (or whose
        deadline passed) are dropped unanswered."""
        now = time.time()
        live = [c for c in calls if c.deadline > now]
        if not live:
            return []
        pipe = self.client.pipeline(transaction=False)
        self._hold(pipe, live, now)
        return [c for c, ok in zip(live, pipe.execute(), strict=True) if ok]

    def answer(self, calls: Sequence[Call], replies: Sequence[dict[str, Any]]) -> list[Call]:
        """Reply to each call; returns the calls this consumer still held (answered): only
        those count. One round trip: each reply is pushed right after its state moves to
        "answered", also for a call its caller gave up meanwhile (SET GET then says
        "abandoned"): the caller no longer reads that reply key, and it expires."""
        if not calls:
            return []
        held = inference.HELD + self.consumer
        ttl_ms = int(inference.STATE_TTL_S * 1000)
        pipe = self.client.pipeline(transaction=False)
        for c, r in zip(calls, replies, strict=True):
            key = inference.reply_key(c.id)
            pipe.set(inference.state_key(c.id), inference.ANSWERED, xx=True, get=True, px=ttl_ms)
            pipe.rpush(key, json.dumps(r, separators=(",", ":")))
            pipe.pexpire(key, ttl_ms)
        previous = pipe.execute()[0::3]
        return [c for c, p in zip(calls, previous, strict=True) if _text(p) == held]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
