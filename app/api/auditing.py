"""What each request records in the audit trail (app.audit), for the API and the pages.

Once a request is authenticated, `begin` attaches an audit entry (actor, action, object,
client address, request id) to the request's database session: the view's first commit
writes it (unsealed) in the same transaction as the change. `finish` (after the response is
made) appends the entries of requests that committed nothing (refusals, failures) with the
response status, unsealed (one INSERT, then the commit; app.audit seals them later), before
the response leaves: a row that cannot be written turns a success into a 503. A read's row
(GET, HEAD) goes into this process's ReadTrail instead, written in a batch within
`audit_read_flush_s` (0: before the answer, as the others); a read answered in the last
interval before the process is killed (SIGKILL) is then not in the trail. It also sets
X-Request-ID.

Actions and objects come from the route by default (`describe`): the first path segment
names the object type, the view arguments its id, the method the verb (GET read or list,
POST create or the last path word, PUT update, DELETE delete), so a route added later is
audited without edits. ACTIONS names the few whose default is not the word a reader expects.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import IO, Any

from flask import Flask, Response, current_app, g, request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app import audit
from app.api import database, db_session
from app.batching import BatchWriter
from app.errors import error_response
from app.models import ApiKey

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_ENVIRON = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Endpoint -> action (or per method) where the route-derived name is not the one to read.
ACTIONS: dict[str, str | dict[str, str]] = {
    "jobs.submit": "job.create",
    "jobs.events": "job.events.read",
    "jobs.stream": "job.events.read",
    "jobs.result": "result.read",
    "datasets.upload": "dataset.create",
    "models.version_file": "model.weights.download",
    "onnx.version_onnx": "model.onnx.download",
    "web.model_onnx": "model.onnx.download",
    "models.set_alias": "alias.set",
    "keys.revoke": "key.revoke",
    "audit.list_events": "audit.read",
    "audit.export": "audit.export",
    "audit.verify": "audit.verify",
    "web.login": "login",
    "web.logout": "logout",
    "web.job_cancel_confirm": "job.read",
    "web.job_result": "result.read",
    "web.job_new": {"GET": "job.form.read", "POST": "job.create"},
    "web.train_new": {"GET": "job.form.read", "POST": "job.create"},
    "web.score_new": {"GET": "job.form.read", "POST": "job.create"},
    "web.ui_jobs": "job.list",
    "web.ui_job": "job.read",
    "web.ui_job_events": "job.events.read",
    "web.ui_job_stream": "job.events.read",
    "web.model_set_alias": "alias.set",
    "web.model_file": "model.weights.download",
    "web.audit_page": "audit.read",
    "web.audit_export": "audit.export",
}
# Endpoint -> object type where the first path segment does not name it.
OBJECT_TYPES = {"web.train_new": "job", "web.score_new": "job", "web.login": "key", "web.logout": "key"}
# View arguments that qualify the object rather than name it (kept in details).
DETAIL_ARGS = frozenset({"which"})
# Request fields (JSON body or form) that say what a write did; never inputs, files, specs
# or secrets (predict inputs are hashed, see _predict_inputs).
DETAIL_FIELDS = {
    "jobs.submit": ("kind",),
    "keys.create": ("role", "expires_in_days"),
    "models.set_alias": ("version",),
    "web.job_new": ("kind",),
    "web.datasets": ("kind",),
    "web.model_set_alias": ("alias", "version"),
}
# Routes that read no tenant data and change nothing (a redirect, static files, docs, probes).
NOT_AUDITED = frozenset({"static", "web.index", "api-docs.openapi_json"})
NOT_AUDITED_BLUEPRINTS = frozenset({"health"})
_PATH_PREFIXES = (("api", "v1"), ("ui", "api"))


@dataclass(frozen=True)
class Described:
    action: str
    object_type: str | None
    object_id: str | None
    details: dict[str, Any] = field(default_factory=dict)


def audited(endpoint: str | None) -> bool:
    if endpoint is None or endpoint in NOT_AUDITED:
        return False
    return endpoint.partition(".")[0] not in NOT_AUDITED_BLUEPRINTS


def singular(word: str) -> str:
    if word.endswith("ses"):
        return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def describe(endpoint: str, rule: str, method: str, view_args: dict[str, Any]) -> Described:
    """The action and object of a request to `rule` (see the module docstring)."""
    segments = [s for s in rule.strip("/").split("/") if s]
    for prefix in _PATH_PREFIXES:
        if tuple(segments[: len(prefix)]) == prefix:
            segments = segments[len(prefix) :]
    # "/usage.csv": the object type is "usage", and "csv" a word of the action
    statics = [w for s in segments if not s.startswith("<") for w in s.split(".")]
    object_type = OBJECT_TYPES.get(endpoint) or (singular(statics[0]) if statics else endpoint.partition(".")[0])
    named = {k: v for k, v in view_args.items() if k not in DETAIL_ARGS}
    object_id = "@".join(str(v) for v in named.values()) or None
    details = {k: v for k, v in view_args.items() if k in DETAIL_ARGS}

    override = ACTIONS.get(endpoint)
    if isinstance(override, dict):
        override = override.get(method)
    if override:
        return Described(override, object_type, object_id, details)
    words = [singular(s) for s in statics[1:]]
    last_is_word = bool(segments) and not segments[-1].startswith("<") and len(segments) > 1
    if method in SAFE_METHODS:
        verb = "list" if len(statics) == 1 and len(segments) == 1 else "read"
    elif method == "POST":
        verb = words.pop() if last_is_word and words else "create"
    elif method in ("PUT", "PATCH"):
        verb = "update"
    elif method == "DELETE":
        verb = "delete"
    else:
        verb = method.lower()
    return Described(".".join([object_type, *words, verb]), object_type, object_id, details)


def request_id() -> str:
    """This request's id: the caller's X-Request-ID when it is a sane token, else a new one."""
    if "request_id" not in g:
        presented = request.environ.get(_REQUEST_ID_ENVIRON, "")  # request.headers: a KeyError when absent
        g.request_id = presented if _REQUEST_ID.fullmatch(presented) else uuid.uuid4().hex
    return g.request_id


def _actor(via: str) -> audit.Actor | None:
    key_id = g.get("api_key_id")
    if key_id is None:
        return None
    prefix = g.get("api_key_prefix") or g.get("web_key_prefix")  # set by the API's and the pages' sign-in checks
    if prefix is None:
        key = db_session().get(ApiKey, key_id)
        prefix = key.prefix if key is not None else None
    return audit.Actor("key", via, key_id, prefix)


def _file_sha256(stream: IO[bytes]) -> str:
    """sha256 of an uploaded file, read in chunks; the stream is rewound for the view."""
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


def _request_fields(names: tuple[str, ...]) -> dict[str, Any]:
    if not names or request.method in SAFE_METHODS:
        return {}
    body = request.get_json(silent=True) if request.is_json else None
    source = body if isinstance(body, dict) else request.form
    found = {name: source.get(name) for name in names}
    return {k: v[:128] if isinstance(v, str) else v for k, v in found.items() if isinstance(v, str | int | float)}


def _predict_inputs() -> dict[str, Any]:
    """How many inputs a predict request sent and their sha256, never the inputs."""
    body = request.get_json(silent=True) if request.is_json else None
    if isinstance(body, dict):
        inputs = body.get("inputs")
    else:
        text = request.form.get("inputs") or ""
        inputs = [line.strip() for line in text.splitlines() if line.strip()]
        inputs += [_file_sha256(f.stream) for f in request.files.getlist("files")]  # images
    if not isinstance(inputs, list):
        return {}
    return {"inputs": len(inputs), "inputs_sha256": audit.sha256_json(inputs)}


def _entry(via: str) -> audit.Entry | None:
    rule = request.url_rule
    if rule is None or not audited(request.endpoint) or request.method == "OPTIONS":
        return None
    assert request.endpoint is not None
    d = describe(request.endpoint, rule.rule, request.method, request.view_args or {})
    details = dict(d.details)
    details.update(_request_fields(DETAIL_FIELDS.get(request.endpoint, ())))
    if d.action == "model.predict":
        details.update(_predict_inputs())
    return audit.Entry(
        tenant_id=g.get("tenant_id"),
        actor=_actor(via),
        action=d.action,
        object_type=d.object_type,
        object_id=d.object_id,
        details=details,
        client_addr=request.remote_addr,
        request_id=request_id(),
    )


def begin(via: str) -> None:
    """Attach this request's audit entry to its session; call once it is authenticated."""
    entry = _entry(via)
    if entry is not None:
        g.audit_entry = entry
        audit.attach(db_session(), entry)


def current() -> audit.Entry | None:
    return g.get("audit_entry")


def note(object_id: str | None = None, **details: Any) -> None:
    """Name the object more precisely (e.g. the resolved model version) or add details."""
    entry = current()
    if entry is None:
        return
    if object_id is not None:
        entry.object_id = object_id
    entry.details.update(details)


def identify(key: ApiKey) -> None:
    """Sign-in: the request's actor is the key just presented (the entry's object too)."""
    entry = current()
    if entry is not None:
        entry.tenant_id = key.tenant_id
        entry.actor = audit.Actor("key", "web", key.id, key.prefix)
        entry.object_id = str(key.id)


def finish(response: Response) -> Response:
    response.headers.setdefault(REQUEST_ID_HEADER, request_id())
    entry = current()
    if entry is None and g.get("tenant_id") is not None:  # refused before `begin` (403)
        entry = _entry("api" if request.path.startswith("/api/") else "web")
    if entry is None or entry.written or entry.tenant_id is None or entry.actor is None:
        return response
    if response.status_code == 429:  # shed load: a refused flood must not become a flood of writes
        return response
    entry.status = response.status_code
    entry.outcome = audit.outcome_for(response.status_code, request.method not in SAFE_METHODS)
    session = db_session()
    trail: ReadTrail | None = current_app.extensions.get(READ_TRAIL)
    if trail is not None and request.method in SAFE_METHODS and trail.healthy:
        # A read changed nothing: its row joins the next batch; what the view left in the
        # session is not committed (teardown rolls it back).
        trail.add([audit.unsealed_row(entry)])
        entry.written = True
        return response
    try:
        if _may_have_changed(session, response):
            session.rollback()  # whatever the view left uncommitted is not part of this row
        audit.append_unsealed(session, entry)
        session.commit()
    except Exception:
        log.exception("could not write the audit row of %s %s", request.method, request.path)
        session.rollback()
        if trail is not None:
            trail.healthy = False  # reads write their own rows (or answer 503) until a write succeeds
        if response.status_code < 400:  # nothing is served that the trail does not show
            failed, status = error_response(503, "The audit trail is unavailable; try again", "audit_unavailable")
            failed.status_code = status
            failed.headers[REQUEST_ID_HEADER] = request_id()
            return failed
        return response
    if trail is not None:
        trail.healthy = True
    if _SEALS.due(entry.tenant_id):
        _seal_after(response, entry.tenant_id)
    return response


def _may_have_changed(session: Session, response: Response) -> bool:
    """Whether the request may have left changes in its session that must not be committed
    with its audit row: a write method, an error, or pending ORM changes. A successful read
    only read, so its transaction commits with the row (no ROLLBACK and new BEGIN)."""
    if request.method not in SAFE_METHODS or response.status_code >= 400:
        return True
    return bool(session.new or session.dirty or session.deleted)


# Unsealed rows this process appended, per tenant: every SEAL_AFTER of them, one bounded seal.
_SEALS = audit.SealSchedule()
READ_TRAIL = "medmaas.read_trail"


class ReadTrail(BatchWriter[dict[str, Any]]):
    """The audit rows of reads (GET, HEAD), stamped when the read is answered and appended in
    batches within `audit_read_flush_s` (one INSERT of many rows, one commit), then sealed
    like any unsealed row. While a batch cannot be written, reads write their own row before
    answering (a 503 when that fails too), as they all do with the setting at 0."""

    name = "medmaas-read-audit"
    what = "audit rows of reads"

    def __init__(self, engine: Engine, interval_s: float) -> None:
        super().__init__(interval_s, flush_size=1000, max_pending=200_000)
        self.engine = engine

    def write(self, batch: list[dict[str, Any]]) -> None:
        with Session(self.engine) as s:
            audit.append_rows(s, batch)
            s.commit()

    def after_write(self, batch: list[dict[str, Any]]) -> None:
        due = {row["tenant_id"] for row in batch if _SEALS.due(row["tenant_id"])}
        for tenant_id in sorted(due):
            audit.seal_inline(self.engine, tenant_id)


def flush_reads() -> None:
    """Write this process's pending read rows now (before the trail is read or exported)."""
    trail: ReadTrail | None = current_app.extensions.get(READ_TRAIL)
    if trail is not None:
        trail.flush()


def _seal_after(response: Response, tenant_id: int) -> None:
    """Seal the tenant's unsealed rows (a bounded batch) once the response has been sent."""
    engine = database().engine
    response.call_on_close(lambda: audit.seal_inline(engine, tenant_id))


def install(app: Flask) -> None:
    """Request hooks for the API (the pages call `begin` from their own guard) and the
    session hooks that write attached entries."""
    audit.install(app.extensions["medmaas.db"].sessionmaker)
    flush_s = app.extensions["medmaas.settings"].audit_read_flush_s
    if flush_s > 0:
        app.extensions[READ_TRAIL] = ReadTrail(app.extensions["medmaas.db"].engine, flush_s)

    @app.before_request
    def _begin_api_audit() -> None:
        if request.path.startswith("/api/v1/") and g.get("api_key_id") is not None:
            begin("api")

    app.after_request(finish)
