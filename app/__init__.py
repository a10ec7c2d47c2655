"""MedMaaS core (settings, database, models, job state machine, leases, stores, artifacts,
ingest, chemistry helpers, job-kind specs) and the web front end built on it.

Importing `app` alone loads nothing heavy: worker processes and RDKit child processes
import core modules (app.chem, app.models, ...) without Flask. The web application comes
from `create_app()` (app/factory.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from app.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    from app.factory import create_app as _create_app

    return _create_app(settings)
