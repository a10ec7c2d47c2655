"""All settings, read from MEDMAAS_* environment variables in one place.

Nothing else in the code base reads the environment: the Settings object is built here
and passed into create_app(), the Celery app and the worker job kinds.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (a bind address or a peer address)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolved(path: Path) -> Path:
    """`path` resolved; an absolute one once per process (resolving costs a system call per
    path part, and artifact roots are resolved before every file access), a relative one each
    time (it depends on the working directory)."""
    return _resolved_absolute(path) if path.is_absolute() else path.resolve()


@functools.lru_cache(maxsize=64)
def _resolved_absolute(path: Path) -> Path:
    return path.resolve()


@dataclass(frozen=True)
class Settings:
    home: Path = Path(".medmaas")
    database_url: str = ""  # default: SQLite under home
    broker_url: str = "redis://127.0.0.1:6379/0"
    artifact_root: str = ""  # default: home/artifacts
    # The artifacts' store of record: "" or file:// = the directory above; s3://bucket/prefix = an
    # S3-compatible object store (app/storage.py), the directory above then only this host's cache and scratch
    artifact_store: str = ""
    s3_endpoint_url: str = ""  # "" = botocore's AWS_ENDPOINT_URL, else AWS itself; credentials: AWS env or profile
    s3_presigned_downloads: bool = False  # downloads of plaintext files redirect to a presigned store URL
    s3_presign_expiry_s: int = 300
    s3_cache_max_age_s: float = 24 * 3600.0  # a host's cached copy unused this long is dropped (0: kept)
    secret_key: str = ""  # default: generated and stored under home
    max_upload_bytes: int = 2 * 1024**3
    max_json_bytes: int = 1 * 1024**2
    archive_max_members: int = 200_000
    archive_max_bytes: int = 8 * 1024**3
    # Text uploads (sequences, libraries) up to this size, and gzip ones that expand to no
    # more, are parsed in the request (201); larger ones by an `ingest` job (202).
    ingest_inline_max_bytes: int = 4 * 1024**2
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 60.0
    reaper_interval_s: float = 10.0
    requeue_grace_s: float = 30.0
    # how long Redis keeps a delivered, unacked job message before handing it to another worker;
    # long by default: a lost worker is the reaper's business, not a redelivery's
    broker_visibility_timeout_s: float = 7 * 24 * 3600.0
    default_max_attempts: int = 3
    default_queue: str = "cpu"
    gpu_queue: str = "gpu"
    inference_queue: str = "inference"
    model_cache_size: int = 8
    # how workers run sequence models on the CPU: auto (ONNX Runtime where the version has a
    # checked model.onnx, else PyTorch), onnx, or torch (workers/ml/onnx_runtime.py)
    scoring_backend: str = "auto"
    # seconds an API key row is trusted per process (revocation elsewhere takes effect within it; 0 = off)
    api_key_cache_s: float = 5.0
    # seconds within which a read's audit row is written, batched with others (app/api/auditing.py
    # ReadTrail); 0: each read's row is written before its answer
    audit_read_flush_s: float = 0.05
    # seconds a model version looked up by the online predict route is trusted per web process
    # (an alias moved or a version deleted elsewhere reaches that route within it; 0 = off)
    model_cache_s: float = 2.0
    torch_threads: int = 0  # intra-op threads per worker process; 0 = torch's default (all cores)
    predict_default_timeout_s: float = 10.0
    # Online predictions (app/inference.py, workers/inference/): a predict call with at most
    # inference_max_inputs inputs (inference_max_explained_inputs with `explain`) is handed to an
    # inference worker over Redis and answered directly; larger ones, and those no worker takes
    # or answers within inference_wait_s (or the caller's timeout), become predict jobs.
    inference_online: bool = True
    # behind `medmaas web`, online calls are awaited on the event loop, not on a web thread
    inference_async_front: bool = True
    inference_max_inputs: int = 1000
    inference_max_explained_inputs: int = 8
    inference_wait_s: float = 2.0
    inference_batch_window_ms: float = 3.0  # how long a batch waits for more calls to the same model
    inference_max_batch: int = 256  # inputs run in one forward pass (a bigger call runs alone)
    inference_threads: int = 1  # batching loops per inference worker process
    score_shard_rows: int = 100_000
    score_batch_size: int = 4096
    web_host: str = "127.0.0.1"
    web_port: int = 5000
    web_threads: int = 8  # Flask requests served at once per web process
    web_stream_threads: int = 8  # event-stream database reads at once per web process (short; they queue)
    log_level: str = "INFO"
    # sessions and metrics
    # Secure session cookie (HTTPS only); None: Secure unless web_host is a loopback address.
    secure_cookies: bool | None = None
    session_lifetime_s: float = 8 * 3600  # a web sign-in ends this long after it began
    session_idle_timeout_s: float = 3600.0  # ... or after this long without a request; 0: no idle limit
    metrics_token: str = ""  # /metrics answers `Authorization: Bearer <token>` (and shows per-tenant counts)
    metrics_loopback: bool = True  # /metrics also answers un-proxied requests from loopback (no token)
    # base64 of 32 random bytes: artifacts are then written encrypted (app/crypto.py); "" = plaintext
    encryption_key: str = ""
    # fairness
    rate_limit_enabled: bool = True
    rate_limit: str = "1200 per minute"  # requests per API key (per address without one), all routes together
    rate_limit_submit: str = "60 per minute"  # on top: job submits, predictions, uploads, sign-ins
    rate_limit_storage_url: str = ""  # default: the broker's Redis (limits' "memory://" counts per process)
    tenant_max_running_per_queue: int = 4  # a tenant's running jobs per queue; more wait queued (0: no limit)
    sse_max_streams_per_key: int = 20  # open event streams per API key (or web sign-in); 0: no limit
    sleep_max_s: float = 60.0  # the `sleep` test helper's longest run
    sleep_queues: str = ""  # queues `sleep` may use, comma-separated; "": the default queue only
    max_epochs: int = 1000
    max_batch_size: int = 4096
    max_max_len: int = 2048  # tokens per sequence a model may read
    max_epoch_rows: int = 100_000_000  # epochs x training rows (x ensemble members x augmented copies) of one job
    max_ensemble: int = 10  # members of one `train` job's ensemble (each is a unit of work)
    max_pretrain_rows: int = 2_000_000  # molecules one `pretrain` job may read
    testing: bool = False

    def __post_init__(self) -> None:
        if self.encryption_key:
            from app.crypto import parse_master_key

            parse_master_key(self.encryption_key)  # a malformed key stops startup with the reason
        if self.artifact_store:
            from app.storage import parse_store_url

            parse_store_url(self.artifact_store)  # a malformed store URL stops startup with the reason
        if self.scoring_backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"MEDMAAS_SCORING_BACKEND must be auto, onnx or torch, not {self.scoring_backend!r}")

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'medmaas.db').resolve()}"

    @property
    def artifacts(self) -> Path:
        return Path(self.artifact_root) if self.artifact_root else resolved(self.home / "artifacts")

    @property
    def cookies_secure(self) -> bool:
        """Whether the session cookie is marked Secure: as set, else unless served on loopback."""
        if self.secure_cookies is not None:
            return self.secure_cookies
        return not is_loopback(self.web_host)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_CASTS: dict[str, Callable[[str], object]] = {
    "int": int,
    "float": float,
    "bool": _bool,
    "bool | None": _bool,
    "Path": Path,
    "str": str,
}


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from MEDMAAS_<FIELD> variables, then apply keyword overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = environ.get(f"MEDMAAS_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _CASTS[str(f.type)](raw)
    values.update(overrides)
    return Settings(**values)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, type) rows for the README's configuration table."""
    rows = []
    for f in dataclasses.fields(Settings):
        rows.append((f"MEDMAAS_{f.name.upper()}", repr(f.default), str(f.type)))
    return rows


def to_env(settings: Settings) -> dict[str, str]:
    """The MEDMAAS_* variables that reproduce these settings in a child process."""
    env = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if f.name == "database_url" and not value:
            value = settings.sqlalchemy_url
        if f.name == "artifact_root" and not value:
            value = str(settings.artifacts)
        if value is None:  # unset: the child derives the default too
            value = ""
        env[f"MEDMAAS_{f.name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env
