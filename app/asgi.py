"""ASGI entry point: what `medmaas web` serves (`gunicorn -k app.asgi.Worker app.asgi:app`).

Every route is the Flask app's, run on a thread pool through a2wsgi, except the small JSON
requests (BUFFERED_ROUTES: BufferedFlask, the whole answer handed back at once), the online
predict route (OnlinePredict) and the two server-sent-event streams
(`/api/v1/jobs/{id}/stream`, Bearer key, and its page twin `/ui/api/jobs/{id}/stream`,
session cookie). An open stream spends nearly all its life
waiting for the job's next event; on a WSGI thread that wait pins the thread, so 100
viewers would need 100 threads. Here a stream is a coroutine on the event loop:

1. The request goes through the Flask app itself, on a thread, exactly as any other request
   would (before_request authentication, the view's tenant check, after_request headers,
   the session cookie). The view's `event_stream_response` sees the `STREAM_HANDOFF` key
   in the environ and, instead of generating the stream there, records the job id and
   position in it. Anything but that handoff (401, 404, 400, ...) is Flask's response,
   forwarded unchanged; so the stream routes authenticate exactly like the Flask routes.
2. The stream itself is `EventFeed` (app.api.jobs, shared with the WSGI generator): each
   step is one short database read on a thread; between steps the coroutine awaits the
   process's EventHub (Redis pub/sub), woken by the commit that appended the event, with
   a safety-net timeout.
3. Each open stream holds one of its API key's (or web sign-in's) `sse_max_streams_per_key`
   slots, counted in Redis across web processes (app.limits.StreamSlots) and released when
   the stream ends for any reason, the client's disconnect included; one more is a 429.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import anyio
from a2wsgi import WSGIMiddleware
from a2wsgi.wsgi import build_environ
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn_worker import UvicornWorker
from werkzeug.test import run_wsgi_app

from app import inference
from app.api.jobs import SSE_MIMETYPE, STREAM_HANDOFF, EventFeed
from app.limits import StreamSlots, too_many_requests

if TYPE_CHECKING:
    from a2wsgi.wsgi_typing import WSGIApp

STREAM_PATHS = ("/api/v1/jobs/{job_id:int}/stream", "/ui/api/jobs/{job_id:int}/stream")
PREDICT_PATH = "/api/v1/models/{name}/predict"
# Requests with small JSON bodies and answers (a page at most): Flask in one hop (BufferedFlask).
BUFFERED_ROUTES = (
    ("/api/v1/jobs", ["GET", "POST"]),
    ("/api/v1/jobs/{job_id:int}", ["GET"]),
    ("/api/v1/jobs/{job_id:int}/events", ["GET"]),
    ("/api/v1/datasets", ["GET"]),
    ("/api/v1/datasets/{dataset_id:int}", ["GET"]),
    ("/api/v1/models", ["GET"]),
    ("/api/v1/models/{name}", ["GET"]),
    ("/api/v1/models/{name}/versions/{version:int}", ["GET"]),
    ("/api/v1/keys", ["GET"]),
)
STREAM_LIMIT_RETRY_AFTER_S = 5


def create_asgi_app(
    flask_app: Flask | None = None, *, wsgi_threads: int | None = None, stream_threads: int | None = None
) -> Starlette:
    """The Flask app (built from the environment when not given) behind an ASGI front that
    streams job events on the event loop."""
    if flask_app is None:
        from app import create_app

        flask_app = create_app()
    settings = flask_app.extensions["medmaas.settings"]
    wsgi_threads = max(1, wsgi_threads or settings.web_threads)
    stream_threads = max(1, stream_threads or settings.web_stream_threads)
    hub = flask_app.extensions["medmaas.hub"]
    db = flask_app.extensions["medmaas.db"]
    slots = StreamSlots.for_settings(settings)
    # Its own small pool, so 100 streams waking at once never starve ordinary requests of
    # threads or pooled database connections (a2wsgi has its own executor).
    limiter = anyio.CapacityLimiter(stream_threads)

    def flask_preamble(environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        return run_flask(flask_app, environ)

    async def stream(request: Request) -> Response:
        environ: dict[str, Any] = dict(build_environ(request.scope, io.BytesIO(b"")))  # type: ignore[arg-type]
        handoff: dict[str, Any] = {}
        environ[STREAM_HANDOFF] = handoff
        status, headers, body = await anyio.to_thread.run_sync(flask_preamble, environ, limiter=limiter)
        if not handoff or status != 200 or request.method != "GET":
            return flask_response(status, headers, body)
        raw = raw_headers(headers)
        job_id, owner = handoff["job_id"], handoff.get("owner", "unknown")
        slot = await anyio.to_thread.run_sync(slots.acquire, owner, limiter=limiter)
        if slot is None:
            refused = stream_limit_response(slots.max_per_key)
            # the Flask response's other headers (security headers, the session cookie) stay
            refused.raw_headers += [(k, v) for k, v in raw if k not in (b"content-type", b"cache-control")]
            return refused
        feed = EventFeed(db, job_id, handoff["after"], max_s=handoff["max_s"])

        async def events() -> AsyncIterator[str]:
            refreshed = time.monotonic()
            # Registered before the first read: a commit between a read and the wait still wakes it.
            with hub.watch(job_id, loop=asyncio.get_running_loop()) as watch:
                while True:
                    text, wait = await anyio.to_thread.run_sync(feed.step, limiter=limiter)
                    if text:
                        yield text
                    if wait is None:
                        return
                    if time.monotonic() - refreshed > slots.refresh_s:  # steps come at least every 15 s
                        await anyio.to_thread.run_sync(slots.refresh, owner, slot, limiter=limiter)
                        refreshed = time.monotonic()
                    if wait > 0:
                        await watch.wait_async(wait)

        response = HeldStream(events(), release=lambda: slots.release(owner, slot))
        response.raw_headers = raw
        return response

    online_predict = OnlinePredict(flask_app, None, wsgi_threads)
    buffered = BufferedFlask(flask_app, None, wsgi_threads)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        hub.close()
        if online_predict._client is not None:
            await online_predict._client.close()

    # (a2wsgi and Starlette spell the WSGI and ASGI callable types differently; they agree at run time)
    wsgi = WSGIMiddleware(cast("WSGIApp", flask_app), workers=wsgi_threads)
    routes: list[BaseRoute] = [Route(path, stream, methods=["GET"]) for path in STREAM_PATHS]
    routes += [Route(path, buffered, methods=methods) for path, methods in BUFFERED_ROUTES]
    online_predict.wsgi = buffered.wsgi = cast(ASGIApp, wsgi)
    if settings.inference_online and settings.inference_async_front:
        routes.append(Route(PREDICT_PATH, online_predict, methods=["POST"]))
    # Everything else, and other methods on these paths (Flask answers 401/405 as ever).
    routes.append(Mount("/", app=cast(ASGIApp, wsgi)))
    asgi = Starlette(routes=routes, lifespan=lifespan)
    # Paths the Mount's pattern cannot match (a %0A in the path) go to Flask too, for its JSON 404.
    asgi.router.default = cast(ASGIApp, wsgi)
    asgi.state.flask_app = flask_app
    return asgi


class BufferedFlask:
    """A request with a small body (none, chunked, or a Content-Length within the JSON limit)
    through the Flask app in one hop: the body is read on the event loop (a chunked one up to a
    byte past the limit, which Flask then refuses), Flask runs on a thread (`run_flask`) and its
    whole answer comes back at once. a2wsgi's streamed hand-off, which the other routes keep,
    crosses between the thread and the loop for the body, the start, each chunk of the answer
    and its end: milliseconds of a small request's time here. A declared length over the limit
    goes to a2wsgi (`wsgi`), where Flask refuses it without reading it."""

    def __init__(self, flask_app: Flask, wsgi: ASGIApp | None, threads: int) -> None:
        self.flask_app, self.wsgi = flask_app, wsgi
        self.max_body = flask_app.extensions["medmaas.settings"].max_json_bytes
        self.limiter = anyio.CapacityLimiter(threads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._small_body(scope, receive, send)
        if body is None:
            return
        status, headers, answer = await self._flask(scope, body, {})
        await flask_response(status, headers, answer)(scope, receive, send)

    async def _small_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The request's body; None once a2wsgi has taken the request (a declared length over
        the limit) or the client went away."""
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            assert self.wsgi is not None
            await self.wsgi(scope, receive, send)
            return None
        if length is None and b"transfer-encoding" not in headers:
            return b""
        return await self._read_body(receive)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """At most max_body + 1 bytes (Flask reads no more than a declared length of them)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body or not message.get("more_body", False):
                return b"".join(chunks)[: self.max_body + 1]

    async def _flask(
        self, scope: Scope, body: bytes, marks: dict[str, Any]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        environ: dict[str, Any] = dict(build_environ(scope, io.BytesIO(body)))  # type: ignore[arg-type]
        if "CONTENT_LENGTH" not in environ:  # a chunked body, read here: Flask sees it whole, with its length
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            environ["CONTENT_LENGTH"] = str(len(body))
        environ.update(marks)
        return await anyio.to_thread.run_sync(run_flask, self.flask_app, environ, limiter=self.limiter)


class OnlinePredict(BufferedFlask):
    """`POST /api/v1/models/{name}/predict` without a thread held while the model runs.

    The request goes through the Flask app on a thread as any other (authentication, the
    view's validation and model look-up, the audit entry, the response headers); the view,
    seeing the HANDOFF key (app.inference), puts the validated call there instead of
    waiting for it. The call is then pushed and its reply awaited on the event loop
    (AsyncInferenceClient), so the number of calls in flight (and the inference worker's
    batches) is not capped by the web threads. A call no worker answered in time goes through
    Flask once more, marked GIVEN_UP, and runs as a predict job exactly as before. Anything
    else (an error, a call too big for the online path, a body without a length or over the
    JSON limit) is Flask's own answer."""

    def __init__(self, flask_app: Flask, wsgi: ASGIApp | None, threads: int) -> None:
        from app.api.models import PredictResponse

        super().__init__(flask_app, wsgi, threads)
        self.response_schema = PredictResponse()
        self._client: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._small_body(scope, receive, send)
        if body is None:
            return
        started = time.monotonic()
        handoff: dict[str, Any] = {}
        status, headers, answer = await self._flask(scope, body, {inference.HANDOFF: handoff})
        if handoff and status == 200:
            reply = await self.client().call(handoff["queue"], handoff["msg"], handoff["wait_s"])
            if reply is None:  # not answered in time: a predict job, as before
                given_up = {inference.GIVEN_UP: time.monotonic() - started}
                status, headers, answer = await self._flask(scope, body, given_up)
            elif reply.error is not None:
                status, answer = (
                    422,
                    self._json(
                        {
                            "error": {
                                "code": "prediction_failed",
                                "message": f"Prediction failed: {reply.error}",
                                "details": None,
                            }
                        }
                    ),
                )
            else:
                answer = self._json(self.response_schema.dump(reply.result))
        await flask_response(status, headers, answer)(scope, receive, send)

    def client(self) -> inference.AsyncInferenceClient:
        if self._client is None:  # made on the event loop that uses it
            self._client = inference.AsyncInferenceClient(self.flask_app.extensions["medmaas.settings"])
        return self._client

    def _json(self, value: Any) -> bytes:
        return (self.flask_app.json.dumps(value) + "\n").encode()


def flask_response(status: int, headers: list[tuple[str, str]], body: bytes) -> Response:
    """A response run_flask gave, as Starlette sends it (Flask's headers, the body's length)."""
    response = Response(body, status_code=status)
    declared = next((v for k, v in headers if k.lower() == "content-length"), None)
    length = declared if declared is not None and not body else str(len(body))  # HEAD: GET's length
    response.raw_headers = [*raw_headers(headers), (b"content-length", length.encode())]
    return response


def raw_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Flask's headers as ASGI's (lower-case latin-1 names), without Content-Length."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers if k.lower() != "content-length"]


def run_flask(flask_app: Flask, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request through the Flask app: (status, headers, body)."""
    app_iter, status, headers = run_wsgi_app(flask_app, environ, buffered=True)
    try:
        body = b"".join(app_iter)
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()
    return int(status.split(" ", 1)[0]), list(headers.items()), body


class HeldStream(StreamingResponse):
    """An event stream that holds a slot of its key's stream limit (app.limits.StreamSlots)
    and releases it however the stream ends: the job ended, the client went away (Starlette
    cancels the stream on http.disconnect), or the server shut down."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, status_code=200, media_type=SSE_MIMETYPE)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def stream_limit_response(limit: int) -> Response:
    retry_after = STREAM_LIMIT_RETRY_AFTER_S
    error = too_many_requests(
        f"This API key already has {limit} event streams open; close one (or poll "
        "GET /api/v1/jobs/{id}/events?after=N) and retry",
        f"{limit} open event streams",
        retry_after,
    )
    return JSONResponse(
        {"error": {"code": error.code, "message": error.message, "details": error.details}},
        status_code=429,
        headers={"Retry-After": str(retry_after)},
    )


class Worker(UvicornWorker):
    """gunicorn's uvicorn worker, with a bounded graceful shutdown: on SIGTERM, requests in
    flight get gunicorn's --graceful-timeout (less a second), then open streams are
    cancelled (clients reconnect with Last-Event-ID) so the worker exits by itself rather
    than being killed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = max(1, int(self.cfg.graceful_timeout) - 1)


app: Starlette  # built on first access, below


def __getattr__(name: str) -> Any:
    # `app.asgi:app` for gunicorn, built on first access: gunicorn's master imports this
    # module for the Worker class and must not build the app (and its pools) before forking.
    if name == "app":
        global app
        app = create_asgi_app()
        return app
    raise AttributeError(name)
