"""The model registry: model summaries, detail (versions and aliases), a version by number
or alias, aliases, bundle files. Resolution itself is app.registry's (the kinds use it too)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import delete as delete_rows
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import artifacts, registry
from app.artifacts import ArtifactStore
from app.config import Settings
from app.models import ModelAlias, ModelVersion, utcnow
from app.registry import ModelNotFound
from app.stores import erasure
from app.stores.errors import Invalid, NotFound

ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
ALIAS_RULE = "letters, digits, '_' and '-', starting with a letter"
# reference.safetensors (the applicability-domain reference: training fingerprints or
# embeddings) is optional: versions before it, and token-sequence models, have none.
BUNDLE_FILES = {"weights": "model.safetensors", "config": "config.json", "reference": "reference.safetensors"}
OPTIONAL_BUNDLE_FILES = {"reference": "this version has no applicability-domain reference"}


class BundleFile(NamedTuple):
    path: Path
    download_name: str


LIST_MODELS_HINT = "list the models with GET /api/v1/models (`medmaas models list`)"


def how_to_list(name: str) -> str:
    """Where to look next after a failed look-up of model `name`."""
    return f"{LIST_MODELS_HINT}, a model's versions and aliases with GET /api/v1/models/{name}"


def version(
    session: Session, tenant_id: int, name: str, version: int | None = None, alias: str | None = None
) -> ModelVersion:
    """A version by number, by alias, or the latest; ModelNotFound (a NotFound: 404) if none,
    with a message naming the model and saying how to list models."""
    try:
        return registry.resolve(session, tenant_id, name, version=version, alias=alias)
    except ModelNotFound as exc:
        raise ModelNotFound(f"{exc.message}; {how_to_list(name)}", exc.code, exc.details) from exc


SERVING = registry.VersionCache()  # this process's look-ups for the online predict route


def serving_version(
    session: Session, tenant_id: int, name: str, version: int | None = None, alias: str | None = None
) -> ModelVersion:
    """`version` for the online predict route: read through SERVING (Settings.model_cache_s),
    so a warm route reaches no database. The copy is detached and read-only."""
    try:
        return SERVING.resolve(session, tenant_id, name, version=version, alias=alias)
    except ModelNotFound as exc:
        raise ModelNotFound(f"{exc.message}; {how_to_list(name)}", exc.code, exc.details) from exc


def resolve_ref(session: Session, tenant_id: int, ref: str) -> ModelVersion:
    """`name`, `name@7` or `name@alias`."""
    return registry.resolve_ref(session, tenant_id, ref)


def summaries(session: Session, tenant_id: int, with_latest: bool = False) -> list[dict[str, Any]]:
    """Per model: name, latest_version, versions (count), aliases; with_latest adds the
    latest ModelVersion row as `latest`."""
    out = []
    for name, latest, count in registry.model_names(session, tenant_id):
        item: dict[str, Any] = {
            "name": name,
            "latest_version": latest,
            "versions": count,
            "aliases": registry.aliases_for(session, tenant_id, name),
        }
        if with_latest:
            item["latest"] = registry.resolve(session, tenant_id, name, version=latest)
        out.append(item)
    return out


def references(session: Session, tenant_id: int) -> list[str]:
    """`name`, `name@alias` and `name@version` references (the score form's suggestions)."""
    out: list[str] = []
    for name, latest, _count in registry.model_names(session, tenant_id):
        out.append(name)
        out.extend(f"{name}@{alias}" for alias in sorted(registry.aliases_for(session, tenant_id, name)))
        out.append(f"{name}@{latest}")
    return out


def detail(session: Session, tenant_id: int, name: str) -> dict[str, Any]:
    """{"name", "aliases", "versions": newest first}; NotFound when it has no versions."""
    versions = list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
            .order_by(ModelVersion.version.desc())
        ).all()
    )
    if not versions:
        raise ModelNotFound(f"Model {name!r} not found; {LIST_MODELS_HINT}")
    return {"name": name, "aliases": registry.aliases_for(session, tenant_id, name), "versions": versions}


def trained_on(session: Session, tenant_id: int, dataset_id: int) -> list[ModelVersion]:
    """The tenant's model versions trained on a dataset, newest first."""
    return list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.tenant_id == tenant_id, ModelVersion.dataset_id == dataset_id)
            .order_by(ModelVersion.id.desc())
        ).all()
    )


def set_alias(session: Session, tenant_id: int, name: str, alias: str, to_version: int) -> dict[str, Any]:
    """Point `alias` at a version (commits); returns the model's detail."""
    if not re.match(ALIAS_PATTERN, alias):
        raise Invalid(f"Invalid alias {alias!r}: {ALIAS_RULE}")
    if alias.isdigit():
        raise Invalid("An alias cannot be a number (it would shadow a version)")
    version(session, tenant_id, name, to_version)
    row = session.scalar(
        select(ModelAlias).where(ModelAlias.tenant_id == tenant_id, ModelAlias.name == name, ModelAlias.alias == alias)
    )
    if row is None:
        session.add(ModelAlias(tenant_id=tenant_id, name=name, alias=alias, version=to_version))
    else:
        row.version, row.updated_at = to_version, utcnow()
    session.commit()
    SERVING.clear()
    return detail(session, tenant_id, name)


def bundle_file(session: Session, settings: Settings, tenant_id: int, name: str, number: int, which: str) -> BundleFile:
    """A version's weights (which=weights, safetensors) or config (which=config, JSON)."""
    if which not in BUNDLE_FILES:
        raise NotFound(f"No file {which!r}; choose from {sorted(BUNDLE_FILES)}")
    mv = version(session, tenant_id, name, number)
    path = ArtifactStore.from_settings(settings).path(mv.artifact_uri) / BUNDLE_FILES[which]
    if not artifacts.is_file(path):
        if which in OPTIONAL_BUNDLE_FILES:
            raise NotFound(OPTIONAL_BUNDLE_FILES[which])
        raise NotFound(f"{BUNDLE_FILES[which]} is missing from the artifact store")
    return BundleFile(path, f"{name}-v{number}-{BUNDLE_FILES[which]}")


def jobs_using(session: Session, tenant_id: int, name: str, number: int | None = None) -> list[int]:
    """Ids of the queued or running jobs that block deleting a version (number) or the whole
    model (None): predict and score jobs using it, and for a whole model, training jobs that
    would register a new version of it."""
    q = select(ModelVersion.id).where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
    if number is not None:
        q = q.where(ModelVersion.version == number)
    return _jobs_using_versions(session, tenant_id, name, list(session.scalars(q).all()), whole=number is None)


def _jobs_using_versions(session: Session, tenant_id: int, name: str, ids: list[int], whole: bool) -> list[int]:
    def uses(kind: str, spec: dict[str, Any]) -> bool:
        trains_it = whole and kind == "train" and spec.get("model_name") == name
        return trains_it or erasure.names_any(spec, erasure.MODEL_VERSION_FIELDS, ids)

    return erasure.jobs_using(session, tenant_id, uses)


def delete_version(session: Session, settings: Settings, tenant_id: int, name: str, number: int) -> None:
    """Erase one version: its row, the aliases pointing at it, then its files. Conflict
    naming the queued or running jobs (predict, score) that use it."""
    ids = erasure.lock(
        session,
        ModelVersion,
        ModelVersion.tenant_id == tenant_id,
        ModelVersion.name == name,
        ModelVersion.version == number,
    )
    if not ids:
        session.rollback()
        raise ModelNotFound(f"Model {name!r} version {number} not found; {how_to_list(name)}")
    _erase_versions(session, settings, tenant_id, name, ids, f"Model {name!r} version {number}")


def delete_model(session: Session, settings: Settings, tenant_id: int, name: str) -> None:
    """Erase a whole model: every version, every alias, their files. Conflict naming the
    queued or running jobs that use one of its versions or train a new one."""
    ids = erasure.lock(session, ModelVersion, ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
    if not ids:
        session.rollback()
        raise ModelNotFound(f"Model {name!r} not found; {LIST_MODELS_HINT}")
    _erase_versions(session, settings, tenant_id, name, ids, f"Model {name!r}", whole=True)


def _erase_versions(
    session: Session, settings: Settings, tenant_id: int, name: str, ids: list[int], what: str, whole: bool = False
) -> None:
    """With the version rows `ids` locked: refuse while used, delete rows and aliases, commit,
    remove the bundles."""
    erasure.refuse_while_used(session, what, _jobs_using_versions(session, tenant_id, name, ids, whole))
    rows = session.execute(
        select(ModelVersion.version, ModelVersion.artifact_uri).where(ModelVersion.id.in_(ids))
    ).all()
    aliases = delete_rows(ModelAlias).where(ModelAlias.tenant_id == tenant_id, ModelAlias.name == name)
    if not whole:
        aliases = aliases.where(ModelAlias.version.in_([version for version, _uri in rows]))
    session.execute(aliases)
    session.execute(delete_rows(ModelVersion).where(ModelVersion.id.in_(ids)))
    store = ArtifactStore.from_settings(settings)
    trash = erasure.Trash(settings, tenant_id)
    for _version, uri in rows:
        trash.move(_bundle_dir(store, tenant_id, uri))
    erasure.commit(session, trash)
    SERVING.clear()
    _remove_if_empty(store.root / f"tenant-{tenant_id}" / "models", name)


def _bundle_dir(store: ArtifactStore, tenant_id: int, uri: str) -> Path | None:
    """A version's bundle directory (<root>/tenant-<id>/models/<name>/<dir>), else None."""
    try:
        path = store.path(uri)
    except ValueError:
        return None
    models_dir = store.root / f"tenant-{tenant_id}" / "models"
    return path if path.is_relative_to(models_dir) and len(path.relative_to(models_dir).parts) >= 2 else None


def _remove_if_empty(models_dir: Path, name: str) -> None:
    """The model's directory once its last bundle is gone (its name is data too)."""
    path = models_dir / name
    if path.resolve().parent != models_dir.resolve():
        return
    with contextlib.suppress(OSError):
        path.rmdir()


def version_count(session: Session, tenant_id: int, name: str) -> int:
    """How many versions the tenant's model `name` has (0: none, or no such model)."""
    q = select(func.count()).where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)
    return session.scalar(q) or 0
