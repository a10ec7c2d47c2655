"""A production-shaped deployment per test module (tests/chaos/deployment.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.deployment import Deployment, deployment


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "chaos: fault-injection trials against a real deployment (tests/chaos)")


@pytest.fixture(scope="module")
def chaos_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("chaos")) as dep:
        yield dep
