"""A small client for the MedMaaS HTTP API (v1), built on `requests` only.

    from medmaas.client import Client

    client = Client("http://127.0.0.1:5000", "mm_...")
    ds = client.upload_dataset("solubility.csv", "sequences", options={"label_columns": "solubility"})
    job = client.train(dataset_id=ds["id"], model_name="sol", arch="rnn", task="regression",
                       target="solubility", epochs=10)
    done = client.wait_for(job["id"], on_event=print)      # follows the SSE stream
    client.predict("sol", ["CCO", "c1ccccc1"])

Every non-2xx answer raises `MedmaasError(status, code, message, details)`, built from the
API's error body `{"error": {"code", "message", "details"}}`; a server that cannot be
reached raises it with status None and code "connection_error".
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Union
from urllib.parse import quote

import requests

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
PathLike = Union[str, "os.PathLike[str]"]


class MedmaasError(Exception):
    """An error answer from the server (or no answer at all: status None)."""

    def __init__(self, status: int | None, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def __str__(self) -> str:
        where = f"{self.status} {self.code}" if self.status is not None else self.code
        return f"{self.message} ({where})"

    def __repr__(self) -> str:
        return f"MedmaasError(status={self.status!r}, code={self.code!r}, message={self.message!r})"


# -- configuration written by `medmaas login` ------------------------------------------------


def config_path() -> Path:
    """$MEDMAAS_CLIENT_CONFIG, else $XDG_CONFIG_HOME/medmaas/config.json (~/.config by default)."""
    explicit = os.environ.get("MEDMAAS_CLIENT_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "medmaas" / "config.json"


def load_config(path: PathLike | None = None) -> dict[str, Any]:
    p = Path(path) if path else config_path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise MedmaasError(None, "bad_config", f"{p} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def save_config(data: Mapping[str, Any], path: PathLike | None = None) -> Path:
    """Write the config readable by its owner only (0600), atomically."""
    p = Path(path) if path else config_path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(data), fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


# -- streamed multipart upload ---------------------------------------------------------------


class _MultipartStream:
    """A multipart/form-data body read from disk in chunks (never held in memory), with a
    known length so the request carries Content-Length rather than chunked encoding."""

    CHUNK = 1024 * 1024

    def __init__(
        self, fields: Mapping[str, str], file_field: str, path: Path, progress: Callable[[int, int], None] | None = None
    ) -> None:
        self.boundary = f"medmaas-{uuid.uuid4().hex}"
        head = b"".join(self._part(name, value) for name, value in fields.items())
        filename = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head += (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        self._head, self._tail = head, f"\r\n--{self.boundary}--\r\n".encode()
        # Kept open across read() calls: closed at the end of the body or by close().
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115
        self._file_size = path.stat().st_size
        self._length = len(head) + self._file_size + len(self._tail)
        self._sent, self._progress = 0, progress
        self._stage = 0  # 0 head, 1 file, 2 tail, 3 done

    def _part(self, name: str, value: str) -> bytes:
        return (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        size = self.CHUNK if size is None or size < 0 else size
        out = b""
        while len(out) < size and self._stage < 3:
            if self._stage == 0:
                out += self._head
                self._stage = 1
            elif self._stage == 1:
                data = self._file.read(size - len(out))
                if data:
                    out += data
                else:
                    self._file.close()
                    self._stage = 2
            else:
                out += self._tail
                self._stage = 3
        self._sent += len(out)
        if self._progress is not None and out:
            self._progress(min(self._sent, self._length), self._length)
        return out

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self.read(self.CHUNK)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._file.close()


# -- the client ------------------------------------------------------------------------------


class Client:
    """One server and one API key. Methods return the API's JSON as plain dicts."""

    def __init__(
        self, url: str, key: str | None = None, *, timeout: float = 30.0, session: requests.Session | None = None
    ) -> None:
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = "medmaas-client/0.1"
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    @classmethod
    def from_config(cls, path: PathLike | None = None, **kwargs: Any) -> Client:
        """The server and key saved by `medmaas login` ($MEDMAAS_URL / $MEDMAAS_API_KEY win)."""
        cfg = load_config(path)
        url = os.environ.get("MEDMAAS_URL") or cfg.get("url")
        key = os.environ.get("MEDMAAS_API_KEY") or cfg.get("key")
        if not url:
            raise MedmaasError(None, "not_logged_in", "No server configured: run `medmaas login URL --key KEY`")
        return cls(url, key, **kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- transport -------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: Any = None,
    ) -> requests.Response:
        """Send one request; raise MedmaasError unless the answer is 2xx."""
        if params:
            params = {k: v for k, v in params.items() if v is not None}
        try:
            resp = self.session.request(
                method,
                self.url + path,
                params=params,
                json=json_body,
                data=data,
                headers=dict(headers or {}),
                stream=stream,
                timeout=self.timeout if timeout is None else timeout,
            )
        except requests.exceptions.SSLError as exc:
            raise MedmaasError(None, "connection_error", f"TLS error talking to {self.url}: {exc}") from None
        except requests.exceptions.Timeout:
            raise MedmaasError(None, "timeout", f"{self.url} did not answer {method} {path} in time") from None
        except requests.exceptions.ConnectionError as exc:
            raise MedmaasError(
                None, "connection_error", f"Cannot reach the MedMaaS server at {self.url}: {_root_cause(exc)}"
            ) from None
        if resp.status_code >= 400:
            raise _error_from(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return _json_body(self.request(method, path, **kwargs), method, path)

    # -- jobs ------------------------------------------------------------------------------
    def submit_job(
        self,
        kind: str,
        spec: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        body: dict[str, Any] = {"kind": kind, "spec": dict(spec or {}), "priority": priority}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/api/v1/jobs", json_body=body, headers=headers)

    def get_job(self, job_id: int) -> dict:
        return self._json("GET", f"/api/v1/jobs/{int(job_id)}")

    def list_jobs(
        self,
        state: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: int | None = None,
        *,
        tag: str | None = None,
        model: str | None = None,
        search: str | None = None,
    ) -> dict:
        """One page: {"items": [...], "next_cursor": id or None}, newest first; filtered by
        state, kind, tag, model (registry name) and text in the spec."""
        params = {"state": state, "kind": kind, "limit": limit, "cursor": cursor, "tag": tag, "model": model}
        return self._json("GET", "/api/v1/jobs", params={**params, "search": search})

    def iter_jobs(self, state: str | None = None, kind: str | None = None, page_size: int = 100) -> Iterator[dict]:
        cursor = None
        while True:
            page = self.list_jobs(state=state, kind=kind, limit=page_size, cursor=cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def events(self, job_id: int, after: int = 0, limit: int = 1000) -> dict:
        """{"items": [{"seq", "ts", "type", "data"}...], "last_seq", "state"}."""
        return self._json("GET", f"/api/v1/jobs/{int(job_id)}/events", params={"after": after, "limit": limit})

    def cancel(self, job_id: int) -> dict:
        return self._json("POST", f"/api/v1/jobs/{int(job_id)}/cancel")

    def delete_job(self, job_id: int) -> None:
        """Erase a finished job (409 `job_active` while it is queued or running)."""
        self.request("DELETE", f"/api/v1/jobs/{int(job_id)}")

    def stream(
        self, job_id: int, after: int = 0, *, deadline: float | None = None, max_reconnects: int = 30
    ) -> Iterator[dict]:
        """Follow a job's server-sent events ({"seq", "ts", "type", "data"}) until it is
        terminal. Reconnects after dropped connections, resuming after the last event seen.
        `deadline` is a time.monotonic() value; past it, TimeoutError is raised."""
        last_seq, failures, retry_s = after, 0, 2.0
        while True:
            try:
                resp = self.request(
                    "GET",
                    f"/api/v1/jobs/{int(job_id)}/stream",
                    params={"after": last_seq},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(last_seq)},
                    stream=True,
                    timeout=(self.timeout, 60),
                )
            except MedmaasError as exc:
                if exc.status is not None or failures >= max_reconnects:
                    raise
                failures += 1
                _check_deadline(deadline)
                time.sleep(min(retry_s * failures, 10))
                continue
            try:
                for kind, payload in _sse_events(resp):
                    _check_deadline(deadline)
                    if kind == "retry":
                        retry_s = max(0.1, payload / 1000)
                        continue
                    if kind != "event":
                        continue  # keep-alive comment
                    event_type, data = payload
                    if event_type == "end":
                        return
                    if isinstance(data, dict) and isinstance(data.get("seq"), int):
                        last_seq = max(last_seq, data["seq"])
                        failures = 0
                        yield data
            except (
                requests.exceptions.ConnectionError,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.Timeout,
            ):
                failures += 1
                if failures > max_reconnects:
                    raise MedmaasError(None, "connection_error", f"lost the event stream of job {job_id}") from None
            finally:
                resp.close()
            # The server ends a stream after a while even for running jobs: reconnect.
            _check_deadline(deadline)
            time.sleep(min(retry_s, 2.0))

    def wait_for(
        self, job_id: int, *, timeout: float | None = None, on_event: Callable[[dict], None] | None = None
    ) -> dict:
        """Block until the job is terminal, calling on_event for each event; returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self.stream(job_id, deadline=deadline):
            if on_event is not None:
                on_event(event)
        job = self.get_job(job_id)
        # The stream ends on the terminal state, but be exact about it.
        while job["state"] not in TERMINAL_STATES:
            _check_deadline(deadline)
            time.sleep(0.5)
            job = self.get_job(job_id)
        return job

    def result(self, job_id: int) -> dict:
        """A finished job's JSON result (for scoring jobs: counts and the top rows)."""
        job = self.get_job(job_id)
        if job["state"] != "succeeded":
            raise MedmaasError(409, "not_ready", f"Job {job_id} is {job['state']}; its result is not available")
        return job.get("result") or {}

    def download_result(self, job_id: int, dest: PathLike, *, format: str | None = None) -> Path:
        """Save GET /jobs/{id}/result (a score file, or the JSON result) to dest (a file, or a
        directory to save under the server's file name). Written atomically.

        The format asked for is `format`, else the one dest's extension names (.csv, .parquet,
        .json); when the server's answer is another format (a train job's JSON result for
        scores.csv, say) nothing is written and MedmaasError(code "format_mismatch") is raised,
        its details {"wanted", "got"}."""
        dest = Path(dest)
        wanted = format or (None if dest.is_dir() else format_of_name(dest.name))
        resp = self.request(
            "GET",
            f"/api/v1/jobs/{int(job_id)}/result",
            params={"format": wanted},
            stream=True,
            timeout=(self.timeout, 300),
        )
        got = _format_of_response(resp)
        if wanted and got and wanted != got:
            resp.close()
            raise MedmaasError(
                None,
                "format_mismatch",
                f"job {int(job_id)}'s result is {got.upper() if got != 'parquet' else 'Parquet'}, "
                f"not the {wanted} asked for",
                {"wanted": wanted, "got": got},
            )
        if dest.is_dir():
            dest = dest / (_attachment_name(resp) or f"job-{int(job_id)}-result.{got or 'json'}")
        return _save_stream(resp, dest)

    # -- datasets --------------------------------------------------------------------------
    def upload_dataset(
        self,
        path: PathLike,
        kind: str,
        *,
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Upload and validate a file (streamed from disk). kind: images, sequences or library.
        Options, e.g. {"text_column": "smiles", "label_columns": "logS"}. Returns the dataset
        with rows, invalid_rows, invalid_samples, sha256, bytes and schema; a large text upload
        comes back with status `processing` (its rows still 0) and its `job_id`: wait_dataset
        waits for it."""
        path = Path(path)
        if not path.is_file():
            raise MedmaasError(None, "no_such_file", f"{path} is not a file")
        fields = {"kind": kind}
        if name:
            fields["name"] = name
        if options:
            fields["options"] = json.dumps(dict(options))
        body = _MultipartStream(fields, "file", path, progress)
        try:
            return self._json(
                "POST",
                "/api/v1/datasets",
                data=body,
                headers={"Content-Type": body.content_type},
                timeout=(self.timeout, 3600),
            )
        finally:
            body.close()

    def get_dataset(self, dataset_id: int) -> dict:
        return self._json("GET", f"/api/v1/datasets/{int(dataset_id)}")

    def wait_dataset(
        self, dataset_id: int, *, timeout: float | None = None, on_event: Callable[[dict], None] | None = None
    ) -> dict:
        """The dataset once it is no longer `processing` (a large upload answers 202 and an
        ingest job parses it): follows that job, calling on_event for each of its events, then
        returns the dataset, `ready` or `failed` (with `error`)."""
        ds = self.get_dataset(dataset_id)
        if ds.get("status") == "processing" and ds.get("job_id"):
            self.wait_for(ds["job_id"], timeout=timeout, on_event=on_event)
            ds = self.get_dataset(dataset_id)
        return ds

    def delete_dataset(self, dataset_id: int) -> None:
        """Erase a dataset: its row and files (409 `in_use`, naming `details.job_ids`, while
        a queued or running job uses it)."""
        self.request("DELETE", f"/api/v1/datasets/{int(dataset_id)}")

    def list_datasets(self, kind: str | None = None, limit: int = 100, cursor: int | None = None) -> dict:
        return self._json("GET", "/api/v1/datasets", params={"kind": kind, "limit": limit, "cursor": cursor})

    # -- training, scoring, prediction -----------------------------------------------------
    def train(
        self,
        *,
        dataset_id: int,
        model_name: str,
        arch: str,
        task: str = "classification",
        target: str | list[str] | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        seed: int | None = None,
        model: Mapping[str, Any] | None = None,
        device: str | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> dict:
        """Submit a `train` job (see the train spec in the API docs); returns the job."""
        spec: dict[str, Any] = {"dataset_id": int(dataset_id), "model_name": model_name, "arch": arch, "task": task}
        optional = {
            "target": target,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "model": dict(model) if model else None,
            "device": device,
            **extra,
        }
        spec.update({k: v for k, v in optional.items() if v is not None})
        return self.submit_job("train", spec, idempotency_key=idempotency_key)

    def score(
        self,
        model: str,
        library_id: int,
        *,
        top_k: int | None = None,
        output: str = "csv",
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> dict:
        """Submit a `score` job: model is `name`, `name@version` or `name@alias`."""
        spec: dict[str, Any] = {"model": model, "library_id": int(library_id), "output": output}
        if top_k is not None:
            spec["top_k"] = int(top_k)
        spec.update({k: v for k, v in extra.items() if v is not None})
        return self.submit_job("score", spec, idempotency_key=idempotency_key)

    def predict(
        self,
        model: str,
        inputs: Iterable[Any],
        *,
        version: int | None = None,
        alias: str | None = None,
        timeout: float | None = None,
        wait: bool = False,
        wait_timeout: float | None = None,
        **options: Any,
    ) -> dict:
        """Online prediction. model may carry its selector (`name@3`, `name@production`).

        Returns {"model", "version", "outputs", "predictions", "job_id"} when the server
        answers within `timeout` seconds (200). Slower, it answers 202 with the predict job:
        with wait=True this follows the job (up to wait_timeout seconds, then TimeoutError)
        and returns its predictions the same way; otherwise it returns the job itself
        ({"id", "state", "kind": "predict", ...}, always with "id"): tell the two apart with
        `"predictions" in answer`. A failed prediction raises MedmaasError (422
        prediction_failed) either way.

        options (None = the server's default): explain, explain_method ("ig" | "gradcam"),
        explain_steps, explain_format ("svg" | "png"), coverage, uncertainty ("auto" |
        "mc_dropout" | "none"), tta, prediction_sets. With explain=True each prediction has
        an `explanation` (atom_weights and an inline `svg`, or `png_base64`)."""
        name, _, selector = model.partition("@")
        if selector and version is None and alias is None:
            if selector.isdigit():
                version = int(selector)
            else:
                alias = selector
        body: dict[str, Any] = {"inputs": list(inputs), **{k: v for k, v in options.items() if v is not None}}
        if version is not None:
            body["version"] = int(version)
        if alias is not None:
            body["alias"] = alias
        if timeout is not None:
            body["timeout"] = timeout
        wait_s = (10 if timeout is None else timeout) + self.timeout
        path = f"/api/v1/models/{quote(name, safe='')}/predict"
        resp = self.request("POST", path, json_body=body, timeout=(self.timeout, wait_s))
        answer = _json_body(resp, "POST", path)
        if resp.status_code != 202:
            return answer
        job = answer if isinstance(answer, dict) else {}
        job_id = _accepted_job_id(job, resp.headers.get("Location"))
        if job_id is None:
            raise MedmaasError(
                202, "bad_response", "The server accepted the prediction (202) but did not say which job runs it"
            )
        job = {**job, "id": job_id}
        return self.predict_result(job_id, timeout=wait_timeout) if wait else job

    def predict_result(self, job_id: int, *, timeout: float | None = None) -> dict:
        """Wait for a predict job (one a 202 answer named) and return its predictions like a
        200 answer; MedmaasError 422 prediction_failed if it failed."""
        job = self.wait_for(job_id, timeout=timeout)
        if job["state"] == "succeeded":
            return {**(job.get("result") or {}), "job_id": job["id"]}
        reason = (job.get("error") or job["state"]).strip().splitlines()
        raise MedmaasError(
            422, "prediction_failed", f"Prediction failed: {reason[0] if reason else job['state']}", {"job_id": job_id}
        )

    # -- model registry --------------------------------------------------------------------
    def models(self) -> list[dict]:
        return self._json("GET", "/api/v1/models")["items"]

    def model(self, name: str) -> dict:
        return self._json("GET", f"/api/v1/models/{quote(name, safe='')}")

    def model_version(self, name: str, version: int) -> dict:
        return self._json("GET", f"/api/v1/models/{quote(name, safe='')}/versions/{int(version)}")

    def delete_model(self, name: str, version: int | None = None) -> None:
        """Erase one version (and the aliases pointing at it), or with no version the whole
        model; 409 `in_use` (naming `details.job_ids`) while a queued or running job uses it."""
        path = f"/api/v1/models/{quote(name, safe='')}"
        self.request("DELETE", path if version is None else f"{path}/versions/{int(version)}")

    def set_alias(self, name: str, alias: str, version: int) -> dict:
        return self._json(
            "PUT",
            f"/api/v1/models/{quote(name, safe='')}/aliases/{quote(alias, safe='')}",
            json_body={"version": int(version)},
        )

    def download_model_file(self, name: str, version: int, dest: PathLike, which: str = "weights") -> Path:
        """Save a version's weights (safetensors) or config (JSON)."""
        resp = self.request(
            "GET",
            f"/api/v1/models/{quote(name, safe='')}/versions/{int(version)}/files/{which}",
            stream=True,
            timeout=(self.timeout, 300),
        )
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / (_attachment_name(resp) or f"{name}-v{version}-{which}")
        return _save_stream(resp, dest)

    # -- server ----------------------------------------------------------------------------
    def check_key(self) -> None:
        """Raise MedmaasError (401) unless the key is accepted."""
        self._json("GET", "/api/v1/jobs", params={"limit": 1})


# -- helpers ---------------------------------------------------------------------------------


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return str(exc) or type(exc).__name__


def _error_from(resp: requests.Response) -> MedmaasError:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return MedmaasError(
            resp.status_code,
            str(err.get("code") or "error"),
            str(err.get("message") or resp.reason),
            err.get("details"),
        )
    text = (resp.text or "").strip().splitlines()[0][:200] if resp.text else resp.reason
    return MedmaasError(resp.status_code, "http_error", f"HTTP {resp.status_code}: {text}")


def _json_body(resp: requests.Response, method: str, path: str) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise MedmaasError(
            resp.status_code,
            "bad_response",
            f"Expected JSON from {method} {path}, got {resp.headers.get('Content-Type')!r}",
        ) from None


def _accepted_job_id(body: Mapping[str, Any], location: str | None) -> int | None:
    """The job a 202 answer names: its body's id (or job_id), else its Location header."""
    for key in ("id", "job_id"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if location:
        tail = location.rstrip("/").rsplit("/", 1)[-1]
        if tail.isdigit():
            return int(tail)
    return None


RESULT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json"}
_MEDIA_FORMATS = {"application/json": "json", "text/csv": "csv", "application/vnd.apache.parquet": "parquet"}


def format_of_name(name: str) -> str | None:
    """csv, parquet or json for a file name with that extension (gzip aside), else None."""
    lowered = name.lower()
    return next((fmt for ext, fmt in RESULT_FORMATS.items() if lowered.endswith(ext)), None)


def _format_of_response(resp: requests.Response) -> str | None:
    media = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media in _MEDIA_FORMATS:
        return _MEDIA_FORMATS[media]
    if media.endswith("+json"):
        return "json"
    return format_of_name(_attachment_name(resp) or "")


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError("timed out waiting for the job")


def _attachment_name(resp: requests.Response) -> str | None:
    disposition = resp.headers.get("Content-Disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            name = Path(value.strip().strip('"')).name
            return name or None
    return None


def _save_stream(resp: requests.Response, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as fh:
            for chunk in resp.iter_content(chunk_size=1024 * 1024):
                fh.write(chunk)
        os.replace(tmp, dest)
    finally:
        resp.close()
        if tmp.exists():
            tmp.unlink()
    return dest


def _raw_chunks(resp: requests.Response) -> Iterator[bytes]:
    """Bytes as they arrive: chunked responses yield per HTTP chunk; otherwise read1()."""
    raw = resp.raw
    if getattr(raw, "chunked", False):
        yield from resp.iter_content(chunk_size=65536)
        return
    read1 = getattr(raw, "read1", None)
    while True:
        data = read1(65536) if read1 is not None else raw.read(1)
        if not data:
            return
        yield data


def _sse_events(resp: requests.Response) -> Iterator[tuple[str, Any]]:
    """Parse text/event-stream: yields ("event", (type, json data)), ("retry", ms) and
    ("comment", text) for keep-alives."""
    buffer = b""
    event_type = "message"
    data_lines: list[str] = []
    for chunk in _raw_chunks(resp):
        buffer += chunk
        while b"\n" in buffer:
            raw_line, buffer = buffer.split(b"\n", 1)
            line = raw_line.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data_lines:
                    text = "\n".join(data_lines)
                    try:
                        data: Any = json.loads(text)
                    except ValueError:
                        data = text
                    yield "event", (event_type, data)
                event_type, data_lines = "message", []
                continue
            if line.startswith(":"):
                yield "comment", line[1:].strip()
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event_type = value or "message"
            elif field == "data":
                data_lines.append(value)
            elif field == "retry" and value.isdigit():
                yield "retry", int(value)
