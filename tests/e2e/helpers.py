"""Helpers for the browser tests."""
from __future__ import annotations

import re
import time


def wait_js(page, expression: str, timeout: float = 30_000, interval: float = 0.1):  # noqa: ANN001, ANN201
    """Poll a JavaScript expression until it is truthy. (page.wait_for_function evaluates its
    predicate with eval inside the page, which the pages' Content-Security-Policy forbids;
    page.evaluate runs over the DevTools protocol and is not subject to it.)"""
    deadline = time.monotonic() + timeout / 1000
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout / 1000:.0f}s waiting for: {expression}")
        time.sleep(interval)


def sign_in(page, key: str) -> None:  # noqa: ANN001
    page.goto("/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/jobs$"))
