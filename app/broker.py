"""The Celery *client*: enough to publish job ids. The broker carries ids only; the SQL
database is the record. Workers build on this (workers.tasks.worker_celery adds the tasks)."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from app.config import Settings

# Task names shared by the publisher (app/) and the worker (workers/).
RUN_JOB = "medmaas.run_job"
SCORE_SHARD = "medmaas.score_shard"


def queue_names(settings: Settings) -> list[str]:
    return [settings.gpu_queue, settings.default_queue, settings.inference_queue]


def create_celery(settings: Settings) -> Celery:
    app = Celery("medmaas", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.default_queue,
        task_queues=[Queue(n, Exchange(n, type="direct"), routing_key=n) for n in queue_names(settings)],
        # A message should outlive the longest job (settings.broker_visibility_timeout_s, a week by
        # default): lost workers are handled by the DB-side reaper. A redelivery of a job still
        # running elsewhere finds it claimed and is dropped (the claim is a compare-and-set).
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # A down broker must not hold an API request for long: the job row is already
        # committed and the reconciler publishes it once the broker is back.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.conf.medmaas_settings = settings
    return app
