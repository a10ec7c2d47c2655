"""The model and data of a `train` job with `devices: N`, built by each rank process of
workers/ml/distributed.py as `run_single` builds them (workers/kinds/train.py): the job's spec,
its dataset row, the data read through the artifact layer. Only JSON crosses to the ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.config import Settings, from_env, to_env

if TYPE_CHECKING:
    from torch import nn

    from workers.ml.data import PreparedData
    from workers.ml.distributed import RankInputs


def rank_inputs(settings: Settings, tenant_id: int, spec: dict[str, Any]) -> RankInputs:
    from workers.ml.distributed import RankInputs

    return RankInputs(
        "workers.kinds.train_ranks:build",
        {"settings": to_env(settings), "tenant_id": tenant_id, "spec": dict(spec)},
    )


def build(settings: dict[str, str], tenant_id: int, spec: dict[str, Any]) -> tuple[nn.Module, PreparedData]:
    from sqlalchemy import select

    from app.artifacts import ArtifactStore
    from app.db import Database
    from app.models import Dataset
    from workers.kinds.train import build_member, prepare_data, pretrained_dir, pretrained_tokenizer

    resolved = from_env(settings)
    db = Database(resolved.sqlalchemy_url)
    try:
        store = ArtifactStore.from_settings(resolved)
        with db.session() as s:
            dataset = s.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.tenant_id == tenant_id))
        if dataset is None:
            raise ValueError(f"dataset {spec['dataset_id']} no longer exists")
        pretrained = pretrained_dir(db, store, spec, tenant_id)
        data = prepare_data(spec, dataset, store, vocabulary=pretrained_tokenizer(pretrained))
        return build_member(spec, data, spec["seed"], pretrained), data
    finally:
        db.dispose()
