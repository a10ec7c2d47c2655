"""The `medmaas` command, and the composition root: the one place that wires the web
front end (app) and the workers together (`medmaas web`, `worker`, `beat`, `standalone`,
and the admin commands). Each command imports what it runs when it runs, so client
commands stay fast. The HTTP client commands (login, jobs, datasets, train, score, ...)
come from medmaas.commands, which imports neither app nor workers.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import IO

import click

from app.config import from_env
from medmaas.commands import client, command_name


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """MedMaaS: model-as-a-service for medical and drug-discovery ML."""
    if os.environ.get("MEDMAAS_ENCRYPTION_KEY"):  # a malformed key stops every command before it starts
        from app.crypto import parse_master_key

        try:
            parse_master_key(os.environ["MEDMAAS_ENCRYPTION_KEY"])
        except ValueError as exc:
            raise click.ClickException(f"{exc} (generate one with `medmaas encryption new-key`)") from None


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="web port (default 5000)")
@click.option("--demo", is_flag=True, help="once up, run `medmaas demo` against it, then keep serving")
def standalone(port: int | None, demo: bool) -> None:
    """Everything in one command: SQLite, an embedded broker, workers and the web server.

    Data, the API key and the children's logs (logs/*.log) go under .medmaas/. Exit code:
    0 after Ctrl-C, 1 when the port is taken, something fails to start or dies, or the demo
    fails."""
    from medmaas.standalone import run_standalone

    settings = from_env(web_port=port) if port else from_env()
    sys.exit(run_standalone(settings, demo=demo))


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--threads", type=int, default=None, help="Flask threads per worker (default MEDMAAS_WEB_THREADS, 8)")
@click.option("--access-log/--no-access-log", default=True, show_default=True)
def web(host: str | None, port: int | None, workers: int, threads: int | None, access_log: bool) -> None:
    """The web server: gunicorn with uvicorn workers serving app.asgi (Flask on --threads threads
    per worker; SSE streams wait on the event loop, not one thread per open stream)."""
    settings = from_env()
    bind = f"{host or settings.web_host}:{port or settings.web_port}"
    if threads is not None:  # the workers build their Settings from the environment
        os.environ["MEDMAAS_WEB_THREADS"] = str(threads)
    if host is not None:  # so the app knows its bind (Secure cookies unless on loopback)
        os.environ["MEDMAAS_WEB_HOST"] = host
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "app.asgi:app",
        "--bind",
        bind,
        "--workers",
        str(workers),
        "--worker-class",
        "app.asgi.Worker",
        "--timeout",
        "120",
        "--graceful-timeout",
        "10",
    ] + (["--access-logfile", "-"] if access_log else [])
    os.execv(sys.executable, args)


@main.command()
@click.option("--queues", default="cpu", show_default=True, help="comma-separated: gpu, cpu, inference")
@click.option(
    "--gpu",
    "gpu",
    default=None,
    help="pin to these GPU indices (sets CUDA_VISIBLE_DEVICES; 0,1 for a train job with devices: 2)",
)
@click.option(
    "--pool",
    type=click.Choice(["solo", "threads", "prefork"]),
    default=None,
    help="default: solo (one job at a time, never forks after CUDA init); threads for inference",
)
@click.option("--concurrency", type=int, default=None)
@click.option("--loglevel", default="INFO")
def worker(queues: str, gpu: str | None, pool: str | None, concurrency: int | None, loglevel: str) -> None:
    """A Celery worker that runs jobs from the given queues."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything imports torch
    from workers.tasks import worker_celery

    settings = from_env()
    celery = worker_celery(settings)
    # Import the ML stack now, not on the first job, so the first predict call is fast.
    # (Importing torch does not initialise CUDA, so forking pools stay safe.)
    import workers.ml.predict  # noqa: F401

    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if pool is None:
        pool = "threads" if names == [settings.inference_queue] else "solo"
    if concurrency is None:
        concurrency = 4 if pool == "threads" else 1
    if gpu is not None and pool == "prefork":
        raise click.UsageError("GPU workers must not fork after CUDA init: use --pool solo or threads")
    celery.worker_main(
        [
            "worker",
            "-Q",
            ",".join(names),
            "-P",
            pool,
            "-c",
            str(concurrency),
            "--loglevel",
            loglevel,
            "-n",
            f"{'-'.join(names)}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@main.command()
def beat() -> None:
    """The maintenance loop: reap jobs whose worker died, republish jobs the broker lost."""
    import logging
    import signal
    import threading

    from workers.tasks import run_maintenance_forever

    settings = from_env()
    logging.basicConfig(level=settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_maintenance_forever(settings, stop)


@main.command()
@click.option("--url", default=None, help="server URL (default: the local standalone server)")
@click.option("--key", default=None, help="API key (default: .medmaas/api_key from standalone)")
@click.option("--epochs", type=int, default=15, show_default=True)
def demo(url: str | None, key: str | None, epochs: int) -> None:
    """Upload a shipped solubility dataset, train an RNN, watch it, predict with it."""
    from medmaas.demo import DemoError, run_demo

    settings = from_env()
    url = url or f"http://{settings.web_host}:{settings.web_port}"
    if key is None:
        key_file = settings.home / "api_key"
        if not key_file.exists():
            raise click.ClickException(
                f"no --key given and {key_file} does not exist; start `{command_name()} standalone` first "
                f"(or run `{command_name()} standalone --demo`, which runs this demo once it is up)"
            )
        key = key_file.read_text().strip()
    try:
        run_demo(url, key, epochs=epochs)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def db() -> None:
    """Database administration."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default head)."""
    from app.migrate import upgrade

    upgrade(from_env(), revision)
    click.echo(f"database at {revision}")


@main.group()
def tenants() -> None:
    """Tenants (isolated groups of users, data and jobs)."""


@tenants.command("create")
@click.argument("name")
def tenants_create(name: str) -> None:
    from app import auth
    from app.db import Database

    database = Database(from_env().sqlalchemy_url)
    with database.session() as s:
        if auth.get_tenant(s, name) is not None:
            raise click.ClickException(f"tenant {name!r} already exists")
        tenant = auth.create_tenant(s, name)
        click.echo(f"created tenant {tenant.name} (id {tenant.id})")


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.option("--tenant", required=True)
@click.option("--name", default="")
@click.option(
    "--role",
    type=click.Choice(["admin", "member", "viewer"]),
    default="admin",
    show_default=True,
    help="admin: everything incl. keys; member: submit and read; viewer: read only",
)
@click.option("--expires-in-days", type=click.IntRange(1, 36500), default=None, help="default: never expires")
def keys_create(tenant: str, name: str, role: str, expires_in_days: int | None) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    from app import audit, auth
    from app.db import Database
    from app.models import KeyRole

    database = Database(from_env().sqlalchemy_url)
    with database.session() as s:
        t = auth.get_tenant(s, tenant)
        if t is None:
            raise click.ClickException(f"no tenant {tenant!r}; create it with `medmaas tenants create {tenant}`")
        key, secret = auth.new_key(s, t.id, name, KeyRole(role), expires_in_days)
        audit.record(s, audit.Entry(t.id, audit.CLI, "key.create", "key", str(key.id), {"role": role}))
        click.echo(secret)


@keys.command("list")
@click.option("--tenant", required=True)
def keys_list(tenant: str) -> None:
    """The tenant's keys (never the secrets): id, prefix, role, name, dates, status."""
    from datetime import datetime

    from app import auth
    from app.db import Database

    def when(value: datetime | None) -> str:
        return value.isoformat(timespec="seconds") if value is not None else "-"

    database = Database(from_env().sqlalchemy_url)
    with database.session() as s:
        t = auth.get_tenant(s, tenant)
        if t is None:
            raise click.ClickException(f"no tenant {tenant!r}")
        click.echo("id\tprefix\trole\tstatus\tname\tcreated_at\tlast_used_at\texpires_at\trevoked_at")
        for k in auth.tenant_keys(s, t.id):
            status = {"API key revoked": "revoked", "API key expired": "expired"}.get(auth.refusal(k) or "", "active")
            click.echo(
                f"{k.id}\t{k.prefix}\t{k.role.value}\t{status}\t{k.name}\t{when(k.created_at)}\t"
                f"{when(k.last_used_at)}\t{when(k.expires_at)}\t{when(k.revoked_at)}"
            )


@keys.command("revoke")
@click.argument("key_id", type=int)
@click.option("--force", is_flag=True, help="revoke even the tenant's last active admin key")
def keys_revoke(key_id: int, force: bool) -> None:
    """Revoke key KEY_ID (see `medmaas keys list`); refuses the tenant's last admin key unless --force."""
    from app import audit, auth
    from app.db import Database
    from app.models import ApiKey

    database = Database(from_env().sqlalchemy_url)
    with database.session() as s:
        key = s.get(ApiKey, key_id)
        if key is None:
            raise click.ClickException(f"no API key {key_id}")
        try:
            auth.revoke(s, key, force=force)
        except auth.LastAdminKey as exc:
            raise click.ClickException(f"{exc}; create another admin key first, or pass --force") from None
        audit.record(s, audit.Entry(key.tenant_id, audit.CLI, "key.revoke", "key", str(key_id), {"force": force}))
        click.echo(f"revoked key {key_id} ({key.prefix})")


@main.command("usage")
@click.option("--tenant", required=True)
@click.option(
    "--from",
    "start",
    type=click.DateTime(["%Y-%m-%d"]),
    default=None,
    help="first UTC day (default: 29 days before --to)",
)
@click.option(
    "--to", "end", type=click.DateTime(["%Y-%m-%d"]), default=None, help="last UTC day, inclusive (default: today)"
)
@click.option("--group-by", type=click.Choice(["day", "model", "metric"]), default="day", show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row, as GET /api/v1/usage?format=csv")
def usage(tenant: str, start: dt.datetime | None, end: dt.datetime | None, group_by: str, as_csv: bool) -> None:
    """A tenant's metered usage (CPU and GPU seconds, predictions, rows scored, bytes stored);
    measures its bytes stored first when the range includes today."""
    from app import auth
    from app.db import Database
    from app.stores import Invalid
    from app.stores import usage as usage_store

    settings = from_env()
    database = Database(settings.sqlalchemy_url)
    with database.session() as s:
        t = auth.get_tenant(s, tenant)
        if t is None:
            raise click.ClickException(f"no tenant {tenant!r}")
        try:
            first, last = usage_store.date_range(start and start.date(), end and end.date())
        except Invalid as exc:
            raise click.ClickException(exc.message) from None
        if first <= usage_store.today() <= last:
            usage_store.snapshot_storage(s, settings, t.id)
        report = usage_store.report(s, t.id, first, last, group_by)
    if as_csv:
        click.echo(usage_store.to_csv(report), nl=False)
        return
    columns = usage_store.CSV_COLUMNS[group_by]
    click.echo("\t".join(columns))
    for row in report.rows:
        click.echo("\t".join("-" if row.get(c) is None else str(row[c]) for c in columns))
    click.echo(f"totals {first} to {last}: " + ", ".join(f"{m} {q}" for m, q in report.totals.items()))


@main.group("audit")
def audit_group() -> None:
    """The audit trail: check its hash chains, export it."""


@audit_group.command("verify")
@click.option("--tenant", default=None, help="only this tenant (default: every tenant)")
def audit_verify(tenant: str | None) -> None:
    """Walk each tenant's hash chain; exit 1 naming the first row edited or deleted by hand."""
    from app import audit as audit_trail
    from app.db import Database

    database = Database(from_env().sqlalchemy_url)
    with database.session() as s:
        try:
            reports = audit_trail.verify(s, tenant)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
    for report in reports:
        click.echo(report.summary(), err=not report.intact)
    broken = [r for r in reports if not r.intact]
    if broken:
        raise SystemExit(1)
    click.echo(f"{len(reports)} tenant(s), {sum(r.rows for r in reports)} audit rows: every chain intact")


@audit_group.command("export")
@click.option("--tenant", required=True)
@click.option("--since", type=click.DateTime(), default=None, help="rows from this UTC time on (e.g. 2026-12-01)")
@click.option("--output", "-o", type=click.File("w"), default="-", help="file to write (default: stdout)")
def audit_export(tenant: str, since: dt.datetime | None, output: IO[str]) -> None:
    """The tenant's audit rows as JSON lines, oldest first, hashes included. The export is
    itself recorded (action audit.export, actor cli)."""
    from app import audit as audit_trail
    from app import auth
    from app.db import Database
    from app.stores import audit as audit_store

    database = Database(from_env().sqlalchemy_url)
    with database.session() as s:
        t = auth.get_tenant(s, tenant)
        if t is None:
            raise click.ClickException(f"no tenant {tenant!r}")
        filters = audit_store.AuditFilter(since=since.replace(tzinfo=dt.UTC) if since else None)
        rows = 0
        for line in audit_trail.export_lines(audit_store.in_order(s, t.id, filters)):
            output.write(line)
            rows += 1
        details = {"rows": rows, **({"since": since.isoformat()} if since else {})}
        audit_trail.record(s, audit_trail.Entry(t.id, audit_trail.CLI, "audit.export", "audit", details=details))


@main.group()
def encryption() -> None:
    """Encryption at rest: master key, tenants' data keys, rotation."""


@encryption.command("new-key")
def encryption_new_key() -> None:
    """Print a new random master key (base64 of 32 bytes) for MEDMAAS_ENCRYPTION_KEY."""
    from app.crypto import new_master_key

    click.echo(new_master_key())


@encryption.command("status")
def encryption_status() -> None:
    """Which master key wraps how many tenants' data keys; exit 1 if some are not under
    MEDMAAS_ENCRYPTION_KEY (they cannot be read with it)."""
    from app.crypto import key_fingerprint, parse_master_key
    from app.db import Database
    from app.stores import data_keys

    settings = from_env()
    current = key_fingerprint(parse_master_key(settings.encryption_key)) if settings.encryption_key else None
    with Database(settings.sqlalchemy_url).session() as s:
        counts = data_keys.master_key_counts(s)
    click.echo(f"MEDMAAS_ENCRYPTION_KEY: {current or 'not set (artifacts are written in plaintext)'}")
    for key_id, n in sorted(counts.items()):
        click.echo(f"master key {key_id}: {n} tenant data key(s){' (current)' if key_id == current else ''}")
    if any(key_id != current for key_id in counts):
        raise SystemExit(1)


@encryption.command("rotate-master")
@click.option(
    "--new-key-env",
    required=True,
    metavar="VAR",
    help="environment variable holding the new master key (keys never go on the command line)",
)
def encryption_rotate_master(new_key_env: str) -> None:
    """Re-wrap every tenant's data key from MEDMAAS_ENCRYPTION_KEY to the key in VAR, in one
    transaction. Files are not rewritten (their data keys do not change). Stop the web
    server and workers first; afterwards start them with MEDMAAS_ENCRYPTION_KEY set to the
    new key."""
    from app.crypto import DecryptionError, key_fingerprint, parse_master_key
    from app.db import Database
    from app.stores import data_keys
    from app.stores.errors import Conflict

    settings = from_env()
    if not settings.encryption_key:
        raise click.ClickException("MEDMAAS_ENCRYPTION_KEY (the current master key) is not set")
    if not os.environ.get(new_key_env):
        raise click.ClickException(f"${new_key_env} is not set")
    try:
        new = parse_master_key(os.environ[new_key_env])
    except ValueError as exc:
        raise click.ClickException(f"${new_key_env}: {exc}") from None
    old = parse_master_key(settings.encryption_key)
    if new == old:
        raise click.ClickException(f"${new_key_env} holds the current master key")
    database = Database(settings.sqlalchemy_url)
    try:
        with database.session() as s:
            done = data_keys.rotate_master(s, old, new)
    except (Conflict, DecryptionError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        database.dispose()
    click.echo(
        f"re-wrapped {done} tenant data key(s) with master key {key_fingerprint(new)}; "
        f"now set MEDMAAS_ENCRYPTION_KEY to the value of ${new_key_env} and start the services"
    )


for _name, _command in client.commands.items():
    main.add_command(_command, _name)


if __name__ == "__main__":
    main()
