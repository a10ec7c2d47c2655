"""Encryption at rest on PostgreSQL: tenants' data keys are created once under concurrent
first writes, master-key rotation is one transaction (all keys or none), and files written
before the rotation read back after it."""

from __future__ import annotations

import base64
import threading

import pytest
from alembic import command
from sqlalchemy import select, update

from app import artifacts, auth
from app.artifacts import ArtifactStore, open_read, open_write
from app.config import from_env
from app.crypto import key_fingerprint, new_master_key, parse_master_key
from app.db import Database
from app.migrate import alembic_config
from app.models import TenantDataKey
from app.stores import data_keys
from app.stores.errors import Conflict
from tests.conftest import throwaway_pg_database

pytestmark = pytest.mark.integration


@pytest.fixture()
def pg(tmp_path):  # noqa: ANN001, ANN201
    with throwaway_pg_database("medmaas_enc") as url:
        command.upgrade(alembic_config(url), "head")
        settings = from_env({}, home=tmp_path, database_url=url, encryption_key=new_master_key())
        db = Database(url)
        yield settings, db
        artifacts.configure(settings.replace(encryption_key=""))
        db.dispose()


def test_concurrent_first_writes_share_one_data_key(pg) -> None:  # noqa: ANN001
    settings, db = pg
    with db.session() as s:
        tenant = auth.create_tenant(s, "lab").id
    master = parse_master_key(settings.encryption_key)
    got: list[tuple[int, bytes]] = []
    barrier = threading.Barrier(8)

    def first_write() -> None:
        own = Database(settings.sqlalchemy_url)  # one process each, as separate workers would be
        try:
            barrier.wait()
            with own.session() as s:
                got.append(data_keys.get_or_create(s, master, tenant))
        finally:
            own.dispose()

    threads = [threading.Thread(target=first_write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    with db.session() as s:
        assert len(s.scalars(select(TenantDataKey)).all()) == 1


def test_rotation_is_all_or_nothing_and_files_still_read(pg) -> None:  # noqa: ANN001
    settings, db = pg
    store = ArtifactStore.from_settings(settings)
    files = {}
    with db.session() as s:
        tenants = [auth.create_tenant(s, f"lab-{i}").id for i in range(3)]
    for t in tenants:
        files[t] = store.tenant_dir(t, "datasets", "d") / "data.parquet"
        with open_write(files[t]) as f:
            f.write(f"tenant {t} rows".encode() * 10_000)
    old, new = parse_master_key(settings.encryption_key), parse_master_key(new_master_key())
    with db.session() as s:
        before = {r.tenant_id: (r.master_key_id, r.wrapped_key) for r in s.scalars(select(TenantDataKey))}
        s.execute(update(TenantDataKey).where(TenantDataKey.tenant_id == tenants[2]).values(master_key_id="0" * 16))
    with pytest.raises(Conflict, match="unknown master keys"), db.session() as s:
        data_keys.rotate_master(s, old, new)
    with db.session() as s:  # nothing changed, not even the rows before the stranger
        now = {r.tenant_id: (r.master_key_id, r.wrapped_key) for r in s.scalars(select(TenantDataKey))}
        assert {t: now[t] for t in tenants[:2]} == {t: before[t] for t in tenants[:2]}
        s.execute(
            update(TenantDataKey)
            .where(TenantDataKey.tenant_id == tenants[2])
            .values(master_key_id=before[tenants[2]][0])
        )
    with db.session() as s:
        assert data_keys.rotate_master(s, old, new) == 3
    with db.session() as s:
        assert data_keys.master_key_counts(s) == {key_fingerprint(new): 3}
    artifacts.configure(settings.replace(encryption_key=base64.b64encode(new).decode()))
    for t, path in files.items():
        with open_read(path) as f:
            assert f.read() == f"tenant {t} rows".encode() * 10_000
