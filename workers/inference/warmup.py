"""Warm-up of an inference worker: the model versions that aliases point at (the ones
callers name in production, e.g. `sol@prod`), most recently re-pointed first and at most
the model cache's size, are loaded into workers/model_cache.py and run once on a small
input, so the first call to them pays neither the load nor torch's first-call costs."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import and_, select

from app.artifacts import ArtifactStore
from app.config import Settings
from app.db import Database
from app.models import ModelAlias, ModelVersion

log = logging.getLogger(__name__)

SAMPLE_SMILES = "CCO"


def aliased_versions(db: Database, limit: int) -> list[tuple[str, str, str]]:
    """(label "name vN", artifact uri, input kind) of the versions aliases point at."""
    with db.session() as s:
        rows = s.execute(
            select(ModelVersion.name, ModelVersion.version, ModelVersion.artifact_uri, ModelVersion.input_kind)
            .join(
                ModelAlias,
                and_(
                    ModelAlias.tenant_id == ModelVersion.tenant_id,
                    ModelAlias.name == ModelVersion.name,
                    ModelAlias.version == ModelVersion.version,
                ),
            )
            .order_by(ModelAlias.updated_at.desc())
        ).all()
    seen: dict[str, tuple[str, str, str]] = {}
    for name, version, uri, kind in rows:
        seen.setdefault(uri, (f"{name} v{version}", uri, kind))
    return list(seen.values())[: max(1, limit)]


def warm_up(settings: Settings, db: Database) -> int:
    """Load (and run once) the aliased versions; returns how many were loaded. A version
    that fails to load is logged and skipped: calls to it report the error themselves."""
    from workers.kinds.predict import predict_inputs
    from workers.model_cache import get_predictor

    store = ArtifactStore.from_settings(settings)
    loaded = 0
    for label, uri, kind in aliased_versions(db, settings.model_cache_size):
        try:
            predictor: Any = get_predictor(store.path(uri), settings.model_cache_size, backend=settings.scoring_backend)
            if kind == "smiles":
                predict_inputs(predictor, [SAMPLE_SMILES], label=label)
            loaded += 1
        except Exception:
            log.warning("warming up %s failed", label, exc_info=True)
    return loaded
