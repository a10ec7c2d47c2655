"""The job state machine's unit tests (tests/unit/test_job_state_machine.py, on SQLite there)
run again here against PostgreSQL: the same functions, with `db` on the session's database."""
from __future__ import annotations

import pytest

from app.db import Database
from tests.unit.test_job_state_machine import *  # noqa: F403  (collects the same tests here)

pytestmark = pytest.mark.integration


@pytest.fixture
def db(pg_settings):
    database = Database(pg_settings.sqlalchemy_url)
    yield database
    database.dispose()
