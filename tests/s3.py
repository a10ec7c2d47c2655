"""A real S3 endpoint for the tests: moto's server (an HTTP S3 API) on loopback, started
once per test session. Import the fixtures into a test module to use them:

    from tests.s3 import s3_endpoint, s3_store  # noqa: F401 (fixtures)

`s3_store` is a fresh bucket's s3://<bucket>/artifacts URL for MEDMAAS_ARTIFACT_STORE; the
settings it goes with come from `s3_settings(settings, url, endpoint)`. Credentials are the
usual AWS environment variables, set here for the whole session (worker subprocesses inherit
them), as a deployment sets them for its hosts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app.config import Settings

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "medmaas-test",
    "AWS_SECRET_ACCESS_KEY": "medmaas-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"])


def make_bucket(endpoint: str) -> str:
    name = f"medmaas-{uuid.uuid4().hex[:16]}"
    client(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(s3_endpoint: str) -> str:
    """MEDMAAS_ARTIFACT_STORE for a fresh, empty bucket."""
    return f"s3://{make_bucket(s3_endpoint)}/artifacts"


def s3_settings(settings: Settings, store_url: str, endpoint: str) -> Settings:
    return settings.replace(artifact_store=store_url, s3_endpoint_url=endpoint)


def objects(endpoint: str, store_url: str) -> dict[str, bytes]:
    """Every object under the store URL's prefix: key relative to the prefix -> its bytes. An
    object deleted between the listing and its read (a job's scratch, removed just after the
    job's success is committed) is left out, as a listing made a moment later would."""
    bucket, _, prefix = store_url.removeprefix("s3://").partition("/")
    s3 = client(endpoint)
    found: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            try:
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            except s3.exceptions.NoSuchKey:
                continue
            found[obj["Key"][len(prefix) + 1 :]] = body
    return found
