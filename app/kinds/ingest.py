"""`ingest`: parse a large upload into its dataset's normalised copy, on a worker.

Only the platform enqueues it (app.stores.datasets.create_from_upload answers 202 with the
dataset `processing` and this job's id); POST /jobs refuses it. Its spec names `dataset_id`,
so erasure refuses to delete the dataset while the job is queued or running. The run is
workers/kinds/ingest.py.

`require_ready` is the submit-time check train and score use on the dataset they name: a
dataset still being parsed is a 409 (`dataset_processing`), one whose parse failed a 422.
"""

from __future__ import annotations

from marshmallow import Schema, validate

from app.config import Settings
from app.fields import StrictInteger
from app.kinds import KindSpec, Spec, SpecError, allowed_queue, register
from app.models import MAX_ID, Dataset, DatasetStatus
from app.stores.errors import Conflict


class IngestSpec(Schema):
    dataset_id = StrictInteger(required=True, validate=validate.Range(min=1, max=MAX_ID))


def queues(settings: Settings) -> tuple[str, ...]:
    return (settings.default_queue,)


def route(spec: Spec, settings: Settings) -> str:
    return allowed_queue("ingest", settings.default_queue, settings)


def require_ready(ds: Dataset, field: str) -> None:
    """Conflict (409) while the dataset is being parsed, SpecError (422) when that failed;
    both name the spec field."""
    if ds.status == DatasetStatus.processing:
        message = f"Dataset {ds.id} is still being processed (job {ds.job_id}); submit again once it is ready"
        raise Conflict(message, "dataset_processing", {"spec": {field: [message]}, "job_id": ds.job_id})
    if ds.status == DatasetStatus.failed:
        message = f"Dataset {ds.id} could not be read: {ds.error or 'its ingest job failed'}"
        raise SpecError(message, "dataset_failed", {"spec": {field: [message]}})


register(
    KindSpec(
        "ingest",
        IngestSpec,
        route,
        "parses a large dataset upload (enqueued by POST /datasets, not submittable)",
        submittable=False,
        queues=queues,
    )
)
