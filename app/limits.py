"""Request rate limits (flask-limiter, counted in the broker's Redis so every web process
shares them) and the per-key cap on open event streams.

Who is counted: an API key (the /api/v1 routes), a web sign-in (the pages' session), else
the client address (the sign-in form, anonymous and refused requests). Two limits apply:
`rate_limit` to every request, and `rate_limit_submit` on top to what starts work or takes
space (job submits, predictions, uploads, sign-ins). Over either: 429 with Retry-After and
the error body's details {"limit", "retry_after_s"}. /healthz, /readyz, the OpenAPI document
and static files are not counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
import uuid
from typing import Any

from apispec import BasePlugin
from flask import Flask, Response, current_app, g, make_response, request, session
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from flask_smorest import Api
from redis.exceptions import RedisError

from app.config import Settings
from app.errors import ApiError

log = logging.getLogger(__name__)

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/api/v1/openapi.json"})
# POST endpoints that start work or store data: the stricter `rate_limit_submit` applies.
SUBMIT_ENDPOINTS = frozenset(
    {
        "jobs.submit",
        "models.predict",
        "datasets.upload",
        "web.login",
        "web.job_new",
        "web.train_new",
        "web.score_new",
        "web.datasets",
        "web.model_predict",
    }
)
TOO_MANY_REQUESTS = "too_many_requests"


def too_many_requests(message: str, limit: str, retry_after_s: int) -> ApiError:
    return ApiError(429, message, TOO_MANY_REQUESTS, {"limit": limit, "retry_after_s": retry_after_s})


def _api_key_id() -> int | None:
    """The request's API key id, authenticating the Bearer key now if the API's own hook has
    not yet (the limiter runs first, so refused keys are counted by address)."""
    if "api_key_id" not in g and request.path.startswith("/api/v1/"):
        from app.api import require_api_key

        # A refused key is answered 401 by the API's own hook; here it counts by address.
        with contextlib.suppress(ApiError):
            require_api_key()
    return g.get("api_key_id")


def requester() -> str:
    """Who a request counts against: its API key, its web sign-in, else its address."""
    key_id = _api_key_id()
    if key_id is not None:
        return f"key:{key_id}"
    from app.web.session_auth import SESSION_ID

    sid = session.get(SESSION_ID)
    if isinstance(sid, str) and sid:
        return "web:" + hashlib.sha256(sid.encode()).hexdigest()[:24]
    return f"addr:{request.remote_addr or 'unknown'}"


def _exempt() -> bool:
    return request.path in EXEMPT_PATHS or request.endpoint in (None, "static") or request.method == "OPTIONS"


def _not_a_submit() -> bool:
    return request.method != "POST" or request.endpoint not in SUBMIT_ENDPOINTS


def _retry_after_s(limiter: Limiter) -> int:
    current = limiter.current_limit
    reset_at = current.reset_at if current is not None else time.time() + 1
    return max(1, math.ceil(reset_at - time.time()))


def init_limits(app: Flask, api: Api, settings: Settings) -> Limiter | None:
    """Count requests (before the API's own authentication hook, so call this before it is
    registered) and document the 429 on every API operation."""
    api.spec.components.response(
        "TooManyRequests",
        {
            "description": "Rate limit exceeded: retry after the `Retry-After` header's seconds",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}},
            "content": {"application/json": {"schema": api.ERROR_SCHEMA}},  # the error body
        },
    )
    plugin = _TooManyRequestsPlugin()
    plugin.init_spec(api.spec)
    api.spec.plugins.append(plugin)
    app.after_request(_record_stream_owner)
    if not settings.rate_limit_enabled:
        return None
    storage = settings.rate_limit_storage_url or settings.broker_url
    limiter = Limiter(
        requester,
        application_limits=[
            ApplicationLimit(settings.rate_limit, scope="requests"),
            ApplicationLimit(settings.rate_limit_submit, scope="submits", exempt_when=_not_a_submit),
        ],
        storage_uri=storage,
        storage_options={"socket_timeout": 2, "socket_connect_timeout": 2} if storage.startswith("redis") else {},
        strategy="sliding-window-counter",
        key_prefix="medmaas",
        # A broker outage must not take the API down with it: requests pass uncounted (logged).
        swallow_errors=True,
    )
    limiter.request_filter(_exempt)
    limiter.init_app(app)
    app.extensions["medmaas.limiter"] = limiter

    def _over_limit(exc: RateLimitExceeded) -> Any:
        limit = str(exc.limit.limit)
        retry_after = _retry_after_s(limiter)
        error = too_many_requests(f"Rate limit of {limit} exceeded; retry in {retry_after} s", limit, retry_after)
        response: Response = make_response(current_app.handle_user_exception(error))
        response.headers["Retry-After"] = str(retry_after)
        return response

    app.register_error_handler(RateLimitExceeded, _over_limit)
    return limiter


def _record_stream_owner(response: Response) -> Response:
    """For a stream that app.asgi is about to serve: whose slot it takes (app.asgi reads it
    from the handoff once the view has authenticated the request)."""
    from app.api.jobs import STREAM_HANDOFF

    handoff = request.environ.get(STREAM_HANDOFF)
    if handoff:
        key_id = g.get("api_key_id")  # set by the API's key check, or the pages' sign-in check
        handoff["owner"] = f"key:{key_id}" if key_id is not None else requester()
    return response


class _TooManyRequestsPlugin(BasePlugin):
    """Adds the 429 response to every operation of the OpenAPI document."""

    def operation_helper(self, path: str | None = None, operations: dict | None = None, **_kw: Any) -> None:
        for operation in (operations or {}).values():
            if isinstance(operation, dict):
                operation.setdefault("responses", {}).setdefault("429", "TooManyRequests")


# -- open event streams per key ----------------------------------------------------------


class StreamSlots:
    """Open event streams per owner (an API key, a web sign-in), counted in Redis so every web
    process shares the count. Each open stream holds a slot: a member of a sorted set scored by
    its expiry, refreshed while the stream is open and removed when it ends; a slot whose
    process died expires after `ttl_s`. A broker outage lets streams open uncounted (logged)."""

    PREFIX = "medmaas:streams:"

    def __init__(self, redis_client: Any, max_per_key: int, ttl_s: float = 60.0) -> None:
        self.redis, self.max_per_key, self.ttl_s = redis_client, max_per_key, ttl_s
        self.refresh_s = ttl_s / 3

    @classmethod
    def for_settings(cls, settings: Settings) -> StreamSlots:
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        return cls(client, settings.sse_max_streams_per_key)

    def acquire(self, owner: str) -> str | None:
        """A slot token ("" when not counted), or None when `owner` already holds
        max_per_key open streams."""
        if self.max_per_key <= 0:
            return ""
        key, token, now = self.PREFIX + owner, uuid.uuid4().hex, time.time()
        try:
            pipe = self.redis.pipeline()
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {token: now + self.ttl_s})
            pipe.expire(key, math.ceil(self.ttl_s) + 1)
            pipe.zcard(key)
            held = pipe.execute()[-1]
            if held > self.max_per_key:  # added first, then counted: two racing openers never both pass
                self.redis.zrem(key, token)
                return None
        except RedisError:
            log.warning("could not count the open streams of %s; this one is not counted", owner, exc_info=True)
            return ""
        return token

    def refresh(self, owner: str, token: str) -> None:
        if not token:
            return
        key = self.PREFIX + owner
        try:
            pipe = self.redis.pipeline()
            pipe.zadd(key, {token: time.time() + self.ttl_s}, xx=True)
            pipe.expire(key, math.ceil(self.ttl_s) + 1)
            pipe.execute()
        except RedisError:
            log.warning("could not refresh a stream slot of %s", owner, exc_info=True)

    def release(self, owner: str, token: str) -> None:
        if not token:
            return
        try:
            self.redis.zrem(self.PREFIX + owner, token)
        except RedisError:
            log.warning("could not release a stream slot of %s; it expires in %g s", owner, self.ttl_s, exc_info=True)

    def held(self, owner: str) -> int:
        """Open streams `owner` holds now."""
        return int(self.redis.zcount(self.PREFIX + owner, time.time(), "+inf"))
