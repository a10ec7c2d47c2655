"""`medmaas jobs tag|compare|clone`, `medmaas models tag|card`: tags, comparing runs, running a
job again with changes, and model cards (HTTP only, through medmaas.client).

    medmaas jobs tag 12 baseline paper-2          # add tags (--remove TAG, --clear)
    medmaas jobs list --tag baseline --model sol --search scaffold
    medmaas jobs compare 12 15 19                 # final metrics and the spec keys that differ
    medmaas jobs clone 12 --set epochs=30 --set params.hidden_size=128 --watch
    medmaas models tag sol@3 candidate
    medmaas models card sol@3 -o sol-v3-card.md   # or --json; --set intended_use="..."

Registered on the client command groups by importing this module (medmaas/commands.py)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import click

from medmaas import commands
from medmaas.client import Client
from medmaas.commands import _after_submit, _fmt, _key_values, api_command, jobs, models


def _client() -> Client:
    return commands.get_client()  # looked up at call time (tests replace it)


def _tags_line(tags: list[str]) -> str:
    return ", ".join(tags) if tags else "(none)"


def _version_ref(ref: str) -> tuple[str, int]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version.isdigit():
        raise click.BadParameter(f"expected NAME@VERSION (e.g. sol@3), got {ref!r}", param_hint="MODEL")
    return name, int(version)


def _tag_body(tags: tuple[str, ...], remove: tuple[str, ...], clear: bool) -> tuple[str, dict[str, Any]]:
    if clear:
        return "PUT", {"tags": list(tags)}
    if not tags and not remove:
        raise click.UsageError("give tags to add, --remove TAG, or --clear")
    return "PATCH", {"add": list(tags), "remove": list(remove)}


# -- tags ------------------------------------------------------------------------------------


@jobs.command("tag")
@click.argument("job_id", type=int)
@click.argument("tags", nargs=-1)
@click.option("--remove", multiple=True, help="a tag to remove (repeat for several)")
@click.option("--clear", is_flag=True, help="replace the job's tags with TAGS (none: remove all)")
@api_command
def jobs_tag(job_id: int, tags: tuple[str, ...], remove: tuple[str, ...], clear: bool) -> None:
    """Add TAGS to a job (and remove --remove ones)."""
    method, body = _tag_body(tags, remove, clear)
    job = _client()._json(method, f"/api/v1/jobs/{job_id}/tags", json_body=body)
    click.echo(f"Job {job['id']} tags: {_tags_line(job['tags'])}")


@models.command("tag")
@click.argument("model")
@click.argument("tags", nargs=-1)
@click.option("--remove", multiple=True, help="a tag to remove (repeat for several)")
@click.option("--clear", is_flag=True, help="replace the version's tags with TAGS (none: remove all)")
@api_command
def models_tag(model: str, tags: tuple[str, ...], remove: tuple[str, ...], clear: bool) -> None:
    """Add TAGS to a model version MODEL (NAME@VERSION)."""
    name, version = _version_ref(model)
    method, body = _tag_body(tags, remove, clear)
    mv = _client()._json(method, f"/api/v1/models/{quote(name, safe='')}/versions/{version}/tags", json_body=body)
    click.echo(f"{mv['name']} v{mv['version']} tags: {_tags_line(mv['tags'])}")


# -- compare ---------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return _fmt(value)


@jobs.command("compare")
@click.argument("job_ids", type=int, nargs=-1, required=True)
@click.option("--all-spec", is_flag=True, help="show every spec key, not only those that differ")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON (curves included)")
@api_command
def jobs_compare(job_ids: tuple[int, ...], all_spec: bool, as_json: bool) -> None:
    """Compare runs: final metrics side by side and the spec keys that differ."""
    data = _client()._json("GET", "/api/v1/jobs/compare", params={"ids": ",".join(map(str, job_ids))})
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    heads = [f"#{j['id']} {j['kind']} {j['state']}" for j in data["jobs"]]
    for title, rows in (("Final metrics", data["metrics"]), ("Spec", data["spec"])):
        shown = rows if (all_spec or title != "Spec") else [r for r in rows if r["differs"]]
        table = Table(title=title, header_style="bold", title_justify="left")
        table.add_column("key")
        for head in heads:
            table.add_column(head, justify="right")
        for row in shown:
            style = "bold yellow" if row["differs"] else None
            table.add_row(row["key"], *(_cell(v) for v in row["values"]), style=style)
        if shown:
            console.print(table)
        else:
            console.print(f"{title}: {'no differences' if rows else 'none'}")


# -- clone -----------------------------------------------------------------------------------


@jobs.command("clone")
@click.argument("job_id", type=int)
@click.option(
    "--set",
    "sets",
    multiple=True,
    help="a spec change path=value (repeat): epochs=30, params.hidden_size=128, split.method=scaffold",
)
@click.option("--priority", type=click.IntRange(-100, 100), default=None, help="default: the job's own")
@click.option("--idempotency-key", default=None, help="resubmitting with the same key returns the same job")
@click.option("--watch", is_flag=True, help="follow the new job until it ends (exit code as `jobs watch`)")
@api_command
def jobs_clone(
    job_id: int, sets: tuple[str, ...], priority: int | None, idempotency_key: str | None, watch: bool
) -> None:
    """Run job JOB_ID again with changes: a new job with its spec edited by --set."""
    client = _client()
    body: dict[str, Any] = {"set": _key_values(sets, "--set")}
    if priority is not None:
        body["priority"] = priority
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    job = client._json("POST", f"/api/v1/jobs/{job_id}/clone", json_body=body, headers=headers)
    click.echo(f"Cloned job {job_id} as job #{job['id']}" + (f" ({', '.join(sets)})" if sets else ""))
    _after_submit(client, job, watch)


# -- model cards -----------------------------------------------------------------------------


@models.command("card")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="the card as JSON instead of Markdown")
@click.option("-o", "--output", type=click.Path(writable=True, dir_okay=False), default=None, help="write it to a file")
@click.option(
    "--set",
    "sets",
    multiple=True,
    help="edit the card first: intended_use=..., out_of_scope=..., limitations=... (empty clears)",
)
@api_command
def models_card(model: str, as_json: bool, output: str | None, sets: tuple[str, ...]) -> None:
    """Print (or save) the model card of MODEL (NAME@VERSION)."""
    name, version = _version_ref(model)
    client = _client()
    base = f"/api/v1/models/{quote(name, safe='')}/versions/{version}"
    if sets:
        changes = {}
        for pair in sets:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"--set must look like key=value, got {pair!r}")
            changes[key] = value or None
        client._json("PATCH", f"{base}/card", json_body=changes)
    if as_json:
        text = json.dumps(client._json("GET", f"{base}/card"), indent=2) + "\n"
    else:
        text = client.request("GET", f"{base}/card.md").text
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
        click.echo(f"Saved the card of {name} v{version} to {output}")
    else:
        click.echo(text, nl=False)
