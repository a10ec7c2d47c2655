"""ORM models: the single source of truth for tenants, keys, jobs and their events."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base

JSONType = JSON().with_variant(JSONB(), "postgresql")


# Ids and versions are 32-bit INTEGER columns: larger numbers name no row.
MAX_ID = 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stores UTC; always returns aware datetimes (SQLite would otherwise drop the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


def in_enum_sql(column: str, cls: type[enum.Enum]) -> str:
    """`column IN ('a', 'b', ...)` over an enum's values: the CHECK text shared by the models and
    migration 0004, so the allowed states are written down once (in the Python enum)."""
    quoted = ("'" + str(m.value).replace("'", "''") + "'" for m in cls)
    return f"{column} IN ({', '.join(quoted)})"


class KeyRole(enum.StrEnum):
    """What an API key may do; each role includes the ones below it (viewer < member < admin)."""

    viewer = "viewer"
    member = "member"
    admin = "admin"

    @property
    def rank(self) -> int:
        return list(KeyRole).index(self)

    def allows(self, needed: KeyRole) -> bool:
        return self.rank >= needed.rank


class DatasetStatus(enum.StrEnum):
    ready = "ready"
    processing = "processing"  # an ingest job is parsing the upload
    failed = "failed"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    __tablename__ = "api_keys"
    # Names become ck_api_keys_<name>; see migration 0006.
    __table_args__ = (CheckConstraint(in_enum_sql("role", KeyRole), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Keys made before migration 0006 became admin keys (the server default).
    role: Mapped[KeyRole] = mapped_column(_enum(KeyRole, "key_role"), default=KeyRole.admin, server_default="admin")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_state_queue", "state", "queue"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        # The database refuses invalid states too (names become ck_jobs_<name>; see migration 0004).
        CheckConstraint(in_enum_sql("state", JobState), name="state"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        CheckConstraint("attempts >= 0", name="attempts"),
        CheckConstraint("max_attempts >= 1", name="max_attempts"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.queued)
    queue: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # sha256 of the submitted request (kind, spec, priority, max_attempts) when it carried an
    # idempotency key: a reused key with a different request is refused (app.jobs.request_digest).
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    # Last allocated job_events.seq; bumped atomically so concurrent reporters never collide.
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    duration_s: Mapped[float | None] = mapped_column(Float)
    # Short labels (app/stores/tags.py) and the job a "run again with changes" copied (no
    # foreign key: that job may be erased later); see migration 0013.
    tags: Mapped[list[str]] = mapped_column(JSONType, default=list, server_default=text("'[]'"))
    cloned_from: Mapped[int | None] = mapped_column(Integer)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class Dataset(Base):
    """An uploaded, validated dataset. `uri` is the original upload (images: never kept, so
    the same as data_uri); `data_uri` the normalised training copy (npz for images, parquet
    for sequences; the upload itself for libraries)."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    invalid_rows: Mapped[int] = mapped_column(Integer, default=0)
    invalid_samples: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    schema: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    stats: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    options: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    uri: Mapped[str] = mapped_column(Text)
    data_uri: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A large upload is parsed by an `ingest` job (job_id): `processing` until it ends, then
    # `ready` (rows, schema, stats filled in) or `failed` with `error` in one sentence.
    status: Mapped[DatasetStatus] = mapped_column(
        _enum(DatasetStatus, "dataset_status"), default=DatasetStatus.ready, server_default="ready"
    )
    error: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(Integer)


class ModelVersion(Base):
    """One trained model: weights (safetensors) and config.json under `artifact_uri`."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    arch: Mapped[str] = mapped_column(String(16))
    task: Mapped[str] = mapped_column(String(32))
    input_kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    dataset_sha256: Mapped[str] = mapped_column(String(64), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    artifact_uri: Mapped[str] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    tags: Mapped[list[str]] = mapped_column(JSONType, default=list, server_default=text("'[]'"))
    # The model card's written parts (intended use, out of scope, limitations) and the software
    # versions recorded at training time; app/cards.py renders the whole card. Migration 0013.
    card: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict, server_default=text("'{}'"))


class ModelAlias(Base):
    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "alias", name="uq_model_aliases_name_alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    alias: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ShardState(enum.StrEnum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class ScoreShard(Base):
    """One block of rows [start_row, stop_row) of a `score` job's library. Any worker on the
    job's queue claims a pending shard with a compare-and-set UPDATE fenced by `attempts`;
    a finished shard keeps its part file (output_uri) until the parent job merges them.

    A `train` job with `ensemble: N` reuses these rows for its members: member i is the row
    with index=i and start_row=stop_row=i (no rows), rows_done its progress in thousandths,
    output_uri its weights (member-{i}.safetensors in the job directory) and stats its metrics
    (workers/kinds/train.py)."""

    __tablename__ = "score_shards"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_score_shards_job_index"),
        Index("ix_score_shards_state_heartbeat", "state", "heartbeat_at"),
        # Names become ck_score_shards_<name>; see migration 0004.
        CheckConstraint(in_enum_sql("state", ShardState), name="state"),
        CheckConstraint("attempts >= 0", name="attempts"),
        CheckConstraint("stop_row >= start_row", name="rows"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    start_row: Mapped[int] = mapped_column(BigInteger)
    stop_row: Mapped[int] = mapped_column(BigInteger)
    # byte offset of start_row in the (uncompressed) source file, so a shard seeks instead of scanning
    offset: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[ShardState] = mapped_column(_enum(ShardState, "shard_state"), default=ShardState.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rows: Mapped[int | None] = mapped_column(BigInteger)
    valid: Mapped[int | None] = mapped_column(BigInteger)
    output_uri: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    stats: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class WebSession(Base):
    """A signed-in browser. The cookie holds a random id; only its SHA-256 is stored, so the
    table cannot be replayed. Sign-out, key revocation and expiry end it here, server-side."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UsageMetric(enum.StrEnum):
    """What the service meters per tenant (app/stores/usage.py). Counters add up; bytes_stored
    is a gauge: each day holds that day's last measurement."""

    cpu_seconds = "cpu_seconds"
    gpu_seconds = "gpu_seconds"
    predict_calls = "predict_calls"
    predict_inputs = "predict_inputs"
    rows_scored = "rows_scored"
    bytes_stored = "bytes_stored"


class Usage(Base):
    """One tenant's metered quantity of one metric on one UTC day, per model version
    (model "" and version 0: not attributed to a model). Writers add to `quantity` with one
    INSERT ... ON CONFLICT DO UPDATE, so concurrent workers never lose an increment."""

    __tablename__ = "usage"
    __table_args__ = (CheckConstraint(in_enum_sql("metric", UsageMetric), name="metric"),)

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    metric: Mapped[UsageMetric] = mapped_column(_enum(UsageMetric, "usage_metric"), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True, default="")
    version: Mapped[int] = mapped_column(Integer, primary_key=True, default=0)
    quantity: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TenantDataKey(Base):
    """A tenant's data key for encryption at rest (app/crypto.py), stored wrapped by the
    master key (MEDMAAS_ENCRYPTION_KEY) named by `master_key_id`, its fingerprint. Encrypted
    files name the data key's `id`; rotating the master key re-wraps every row."""

    __tablename__ = "tenant_data_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), unique=True)
    master_key_id: Mapped[str] = mapped_column(String(32))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    rewrapped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """One entry of a tenant's append-only audit trail: who (key, or `cli` / `system`), what
    (action, object), when, from where (client address, request id), and how it ended.
    Rows are hash-chained per tenant (`hash` covers the row's fields and `prev_hash`); see
    app/audit.py. A read's row is first written unsealed (seq, prev_hash and hash NULL) and
    chained later by the sealer, in id order. Key ids are plain columns, not foreign keys:
    the trail outlives its keys."""

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("tenant_id", "seq", name="uq_audit_events_tenant_seq"),
        Index("ix_audit_events_tenant_action", "tenant_id", "action"),
        Index("ix_audit_events_tenant_object", "tenant_id", "object_type", "object_id"),
        Index("ix_audit_events_tenant_ts", "tenant_id", "ts"),
        # the rows the sealer has still to chain (few: it runs every maintenance tick)
        Index(
            "ix_audit_events_unsealed",
            "tenant_id",
            "id",
            postgresql_where=text("seq IS NULL"),
            sqlite_where=text("seq IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    seq: Mapped[int | None] = mapped_column(BigInteger)  # None until sealed
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(32))  # "key", "cli" or "system"
    via: Mapped[str] = mapped_column(String(16))  # "api", "web", "cli", "system"
    key_id: Mapped[int | None] = mapped_column(Integer)
    key_prefix: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))  # ok, unchanged, denied, failed
    status: Mapped[int | None] = mapped_column(Integer)
    client_addr: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    prev_hash: Mapped[str | None] = mapped_column(String(64))  # None until sealed
    hash: Mapped[str | None] = mapped_column(String(64))  # None until sealed


class AuditHead(Base):
    """The last sequence number and hash of a tenant's audit trail. Appending locks this row
    (UPDATE ... RETURNING) for the rest of the transaction, so concurrent appends of one
    tenant queue up and the chain never forks; `medmaas audit verify` compares it with the
    last row to find rows deleted from the end."""

    __tablename__ = "audit_heads"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))
