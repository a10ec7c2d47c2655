"""Stores: the queries more than one caller needs, one module per resource.

    from app.stores import jobs as jobs_store
    job = jobs_store.get(session, tenant_id, job_id)

Core code: a store imports the app core only (models, job state machine, kinds' specs,
artifacts, ingest, dispatch), never app.api, app.web, Flask's request globals or workers.
Every function takes an explicit `Session` and `tenant_id`, and a problem is a domain
error (`NotFound`, `Conflict`, `Invalid`, the kinds' `SpecError`, `UploadTooLarge`,
`IngestError`) that app.errors maps to the one error body, for the API and the pages alike.
"""

from __future__ import annotations

from app.stores.errors import Conflict, Invalid, NotFound, StoreError

__all__ = ["Conflict", "Invalid", "NotFound", "StoreError"]
