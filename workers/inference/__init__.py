"""The online inference path of inference workers (see app/inference.py for the protocol):
`attach(celery)` starts an InferenceServer beside Celery's pool once a worker that consumes
the inference queue is ready, and stops it (flushing its records) when the worker shuts down."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

log = logging.getLogger(__name__)

_server: Any = None


def attach(celery: Celery) -> None:
    signals.worker_ready.connect(_start, weak=False, dispatch_uid="medmaas-inference-start")
    signals.worker_shutdown.connect(_stop, weak=False, dispatch_uid="medmaas-inference-stop")


def _start(sender: Any = None, **_kw: Any) -> None:
    global _server
    app = getattr(sender, "app", None)
    settings = getattr(app, "medmaas_settings", None)
    if app is None or settings is None or _server is not None:
        return
    if settings.inference_queue not in (app.amqp.queues.consume_from or {}):
        return
    from workers.inference.server import InferenceServer
    from workers.tasks import get_db, worker_name

    _server = InferenceServer(settings, get_db(settings), f"{worker_name()}:online")
    _server.start()


def _stop(**_kw: Any) -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None
