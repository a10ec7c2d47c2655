"""The `medmaas` command, and the composition root: the one place that wires the web
front end (app) and the workers together (`medmaas web`, `worker`, `beat`, `standalone`,
and the admin commands). Each command imports what it runs when it runs, so client
commands stay fast. The HTTP client commands (login, jobs, datasets, train, score, ...)
come from medmaas.commands, which imports neither app nor workers.
"""

from __future__ import annotations

import os
import sys

import click

from app.config import from_env
from medmaas.commands import client, command_name


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """MedMaaS: model-as-a-service for medical and drug-discovery ML."""


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
@click.option("--gpu", "gpu", default=None, help="pin to this GPU index (sets CUDA_VISIBLE_DEVICES)")
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
    from app import auth
    from app.db import Database
    from app.models import KeyRole

    database = Database(from_env().sqlalchemy_url)
    with database.session() as s:
        t = auth.get_tenant(s, tenant)
        if t is None:
            raise click.ClickException(f"no tenant {tenant!r}; create it with `medmaas tenants create {tenant}`")
        click.echo(auth.create_key(s, t, name, KeyRole(role), expires_in_days))


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
    from app import auth
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
        click.echo(f"revoked key {key_id} ({key.prefix})")


for _name, _command in client.commands.items():
    main.add_command(_command, _name)


if __name__ == "__main__":
    main()
