"""`medmaas` client commands: talk HTTP to a MedMaaS server through medmaas.client.

    medmaas login http://127.0.0.1:5000 --key mm_...
    medmaas datasets upload solubility.csv --kind sequences --option label_columns=solubility
    medmaas train --dataset 1 --arch rnn --task regression --target solubility --model-name sol --epochs 10 --watch
    medmaas score sol@production 2 --top-k 100 --output parquet --watch -o scores.parquet
    medmaas jobs list --state running
    medmaas jobs watch 7        # exit code 0 succeeded, 1 failed, 2 cancelled

Errors from the server (bad key, unknown job, invalid spec) print one clear line and exit
with code 3; nothing here prints a traceback for them. This module imports only click,
rich and the light medmaas client (requests), never Flask, the workers or torch.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from medmaas.client import (
    TERMINAL_STATES,
    Client,
    MedmaasError,
    config_path,
    format_of_name,
    load_config,
    save_config,
)
from medmaas.formatting import human_duration

EXIT_API_ERROR = 3
WATCH_EXIT = {"succeeded": 0, "failed": 1, "cancelled": 2}
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@click.group()
def client() -> None:
    """The HTTP client commands (merged into the `medmaas` command by medmaas.cli)."""


class ClientError(click.ClickException):
    exit_code = EXIT_API_ERROR

    def format_message(self) -> str:
        return self.message


def command_name() -> str:
    """How the user runs this `medmaas` again, for the commands that messages suggest:
    `medmaas` when that is on PATH and is this installation's, else the script's own path
    (e.g. `.venv/bin/medmaas` when the virtual environment is not activated)."""
    beside = os.path.join(os.path.dirname(sys.executable), "medmaas")
    if not os.path.exists(beside):
        return "medmaas"
    found = shutil.which("medmaas")
    if found and os.path.realpath(found) == os.path.realpath(beside):
        return "medmaas"
    relative = os.path.relpath(beside)
    return relative if not relative.startswith("..") else beside


def _explain(exc: MedmaasError, client: Client | None = None) -> str:
    me = command_name()
    if exc.status == 401:
        where = f" by {client.url}" if client else ""
        url = client.url if client else "URL"
        return (
            f"The API key was rejected{where} ({exc.message}). Log in with a valid key: "
            f"`{me} login {url} --key KEY` (`{me} standalone` saves its key in .medmaas/api_key)."
        )
    if exc.code in ("connection_error", "timeout"):
        return (
            f"{exc.message}. Is the server running? (`{me} standalone` starts one here; "
            f"`{me} login URL --key KEY` sets the address.)"
        )
    text = f"{exc.message} ({exc.status} {exc.code})" if exc.status else exc.message
    if exc.details:
        text += "\n" + json.dumps(exc.details, indent=2, default=str)
    return text


def api_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MedmaasError / TimeoutError into a one-line message and exit code 3."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedmaasError as exc:
            raise ClientError(_explain(exc)) from None
        except TimeoutError as exc:
            raise ClientError(str(exc) or "timed out") from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


def get_client() -> Client:
    try:
        return Client.from_config()
    except MedmaasError as exc:
        if exc.code == "not_logged_in":
            me = command_name()
            raise ClientError(
                f"No server configured: run `{me} login URL --key KEY` first (for `{me} standalone` on this "
                f'machine: `{me} login http://127.0.0.1:5000 --key "$(cat .medmaas/api_key)"`).'
            ) from None
        raise ClientError(exc.message) from None


def _json_option(value: str | None, what: str) -> dict[str, Any]:
    if not value:
        return {}
    text = value
    if value.startswith("@"):
        text = Path(value[1:]).read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{what} must be a JSON object")
    return data


def _key_values(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{what} must look like key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)  # numbers, true/false, lists
        except ValueError:
            out[key] = value
    return out


def _age(ts: str | None) -> str:
    if not ts:
        return "—"
    dt = datetime.fromisoformat(ts)
    dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    return human_duration((datetime.now(UTC) - dt).total_seconds()) + " ago"


def _model_label(job: dict) -> str:
    spec = job.get("spec") or {}
    for value in (spec.get("model_name"), spec.get("model")):
        if isinstance(value, str):
            return value
    return ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_line(data: dict) -> str:
    skip = {"epoch", "step", "lr", "attempt"}
    parts = [f"epoch {data['epoch']}"] if "epoch" in data else []
    parts += [
        f"{k} {_fmt(v)}"
        for k, v in sorted(data.items(), key=lambda kv: _metric_rank(kv[0]))
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return " · ".join(parts)


def _metric_rank(key: str) -> tuple[int, str]:
    order = ("train", "val", "test")
    return next((i for i, p in enumerate(order) if key.startswith(p)), len(order)), key


# -- login -----------------------------------------------------------------------------------


@client.command("login")
@click.argument("url")
@click.option(
    "--key",
    envvar="MEDMAAS_API_KEY",
    prompt="API key",
    hide_input=True,
    help="an API key (mm_...); prompted for if not given",
)
@api_command
def login(url: str, key: str) -> None:
    """Check an API key against the server at URL and save both (config file mode 0600)."""
    try:
        client = Client(url, key.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    try:
        client.check_key()
    except MedmaasError as exc:
        raise ClientError(_explain(exc, client)) from None
    path = save_config({**load_config(), "url": client.url, "key": key.strip()})
    click.echo(f"Logged in to {client.url}; settings saved in {path}")


@client.command("logout")
def logout() -> None:
    """Forget the saved API key."""
    cfg = load_config()
    if "key" in cfg:
        cfg.pop("key")
        save_config(cfg)
    click.echo(f"Logged out ({config_path()})")


# -- jobs ------------------------------------------------------------------------------------


@client.group("jobs")
def jobs() -> None:
    """List, inspect, follow and cancel jobs on the server."""


@jobs.command("list")
@click.option("--state", type=click.Choice(STATES))
@click.option("--kind")
@click.option("--tag", default=None, help="only jobs with this tag")
@click.option("--model", default=None, help="only jobs that train or use this model (registry name)")
@click.option("--search", default=None, help="only jobs whose spec contains this text")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@api_command
def jobs_list(
    state: str | None,
    kind: str | None,
    tag: str | None,
    model: str | None,
    search: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Your jobs, newest first."""
    page = get_client().list_jobs(state=state, kind=kind, limit=limit, tag=tag, model=model, search=search)
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("ID", "KIND", "MODEL", "STATE", "PROGRESS", "AGE", "DURATION"):
        table.add_column(col, justify="right" if col in ("ID", "PROGRESS") else "left")
    for job in page["items"]:
        table.add_row(
            str(job["id"]),
            job["kind"],
            _model_label(job),
            _styled_state(job["state"]),
            f"{100 * (job['progress'] or 0):.0f}%",
            _age(job["created_at"]),
            human_duration(job.get("duration_s")),
        )
    console = Console()
    if page["items"]:
        console.print(table)
    else:
        console.print("no jobs")
    if page.get("next_cursor"):
        console.print(f"(more: older than job {page['next_cursor']}; use --limit)")


def _styled_state(state: str) -> str:
    colour = {"queued": "white", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}
    return f"[{colour.get(state, 'white')}]{state}[/]"


@jobs.command("show")
@click.argument("job_id", type=int)
@click.option("--events", "show_events", is_flag=True, help="also print the job's events")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@api_command
def jobs_show(job_id: int, show_events: bool, as_json: bool) -> None:
    """One job: state, progress, spec, result or error."""
    client = get_client()
    job = client.get_job(job_id)
    if as_json:
        if show_events:
            job = {**job, "events": client.events(job_id, limit=10_000)["items"]}
        click.echo(json.dumps(job, indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(
        f"[bold]Job {job['id']}[/] · {job['kind']} · {_styled_state(job['state'])}"
        + (" (cancel requested)" if job["cancel_requested"] and job["state"] not in TERMINAL_STATES else "")
    )
    rows = [
        ("progress", f"{100 * job['progress']:.0f}%  {job['message']}"),
        ("attempts", f"{job['attempts']} of {job['max_attempts']}"),
        ("model", _model_label(job) or "—"),
        ("queue", job["queue"]),
        ("worker", job.get("worker") or "—"),
        ("created", f"{job['created_at']} ({_age(job['created_at'])})"),
        ("started", job.get("started_at") or "—"),
        ("finished", job.get("finished_at") or "—"),
        ("duration", human_duration(job.get("duration_s"))),
    ]
    for name, value in rows:
        console.print(f"  [dim]{name:<9}[/] {value}", highlight=False)
    console.print("  [dim]spec[/]", json.dumps(job["spec"], sort_keys=True), highlight=False)
    if job.get("error"):
        console.print(f"  [red]error[/]    {job['error']}", highlight=False)
    if job.get("result") is not None:
        console.print("  [dim]result[/]", json.dumps(job["result"], sort_keys=True)[:2000], highlight=False)
    if show_events:
        for ev in client.events(job_id, limit=10_000)["items"]:
            console.print(
                f"  {ev['seq']:>4} {ev['ts'][11:19]} {ev['type']:<16} {json.dumps(ev['data'], sort_keys=True)}",
                highlight=False,
            )


@jobs.command("watch")
@click.argument("job_id", type=int)
@click.option("--timeout", type=float, default=None, help="give up after this many seconds (exit 3)")
@api_command
def jobs_watch(job_id: int, timeout: float | None) -> None:
    """Follow a job live (progress bar, ETA, metrics) until it ends.

    Exit code: 0 succeeded, 1 failed, 2 cancelled, 3 could not follow it."""
    sys.exit(watch_job(get_client(), job_id, timeout))


def watch_job(client: Client, job_id: int, timeout: float | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    console = Console()
    job = client.get_job(job_id)
    console.print(
        f"[bold]Job {job_id}[/] · {job['kind']}" + (f" · {_model_label(job)}" if _model_label(job) else ""),
        highlight=False,
    )
    columns = [
        TextColumn("{task.fields[state]:<9}"),
        BarColumn(bar_width=None),
        TaskProgressColumn(),
        TextColumn("{task.fields[eta]}"),
        TextColumn("[dim]{task.fields[message]}", markup=True),
    ]
    with Progress(*columns, console=console, transient=False, expand=True) as progress:
        task = progress.add_task(
            "job",
            total=1.0,
            # rich annotates add_task's `completed` as int, but it is a float like Task.completed
            completed=job["progress"] or 0.0,  # type: ignore[arg-type]
            state=job["state"],
            eta="",
            message=job.get("message") or "",
        )

        def on_event(ev: dict) -> None:
            data = ev.get("data") or {}
            if ev["type"] == "progress":
                eta = data.get("eta_s")
                progress.update(
                    task,
                    completed=float(data.get("progress") or 0.0),
                    eta=f"ETA {human_duration(eta)}" if isinstance(eta, (int, float)) else "",
                    message=str(data.get("message") or "")[:60],
                )
            elif ev["type"] == "metric":
                progress.console.print(f"  {_metrics_line(data)}", highlight=False)
            elif ev["type"] == "state":
                progress.update(task, state=data.get("to", ""))
                extra = f" · {data['reason']}" if data.get("reason") else ""
                extra += f" on {data['worker']}" if data.get("worker") else ""
                progress.console.print(
                    f"  [dim]{ev['ts'][11:19]}[/] → {_styled_state(data.get('to', '?'))} "
                    f"(attempt {data.get('attempt')}){extra}",
                    highlight=False,
                )
            elif ev["type"] == "log" and data.get("message"):
                progress.console.print(f"  [dim]{data['message']}[/]", highlight=False)
            elif ev["type"] == "cancel_requested":
                progress.update(task, message="cancel requested")

        final = client.wait_for(job_id, timeout=timeout, on_event=on_event)
        progress.update(
            task, completed=final["progress"] or 0.0, state=final["state"], eta="", message=final.get("message") or ""
        )
    state = final["state"]
    summary = f"Job {job_id} {_styled_state(state)} after {human_duration(final.get('duration_s'))}"
    if state == "failed" and final.get("error"):
        summary += f": {final['error'].strip().splitlines()[-1]}"
    console.print(summary, highlight=False)
    if state == "succeeded":
        for line in result_summary(final):
            console.print(line, highlight=False, markup=False)
    return WATCH_EXIT.get(state, EXIT_API_ERROR)


def result_summary(job: dict) -> list[str]:
    """What a succeeded job produced, in the words of its kind (the last lines of a watch)."""
    result = job.get("result") or {}
    kind, job_id, me = job.get("kind"), job.get("id"), command_name()
    model = f"{result.get('model')} version {result.get('version')}" if result.get("model") else "the model"
    if kind == "train":
        test = (result.get("metrics") or {}).get("test") or {}
        scores = " · ".join(f"{k} {_fmt(v)}" for k, v in sorted(test.items()) if _is_number(v))
        lines = [f"Model {model} registered" + (f"; test {scores}" if scores else "")]
        if result.get("model") and result.get("version"):
            lines.append(f"Predict with it: {me} predict {result['model']}@{result['version']} INPUT ...")
        return lines
    if kind == "score":
        rows, valid, invalid = result.get("rows"), result.get("valid"), result.get("invalid")
        lines = [f"Scored {rows} rows with {model}: {valid} valid, {invalid} invalid"]
        reasons = result.get("invalid_reasons") or {}
        if reasons:
            lines.append("  invalid: " + "; ".join(f"{n}× {why}" for why, n in list(reasons.items())[:3]))
        fmt = result.get("format") or (job.get("spec") or {}).get("output") or "csv"
        lines.append(f"Download the scores: {me} download {job_id} -o scores.{fmt}")
        drawn = [e for e in result.get("explanations") or [] if e.get("url")]
        if drawn:
            lines.append(f"Drawings of the top {len(drawn)} with their attributions: GET {drawn[0]['url']} ...")
        return lines
    if kind == "predict":
        predictions = result.get("predictions") or []
        failed = sum(1 for p in predictions if isinstance(p, dict) and "error" in p)
        return [
            f"{len(predictions)} predictions from {model}"
            + (f" ({failed} inputs could not be read)" if failed else ""),
            f"See them: {me} jobs show {job_id} --json, or {me} download {job_id} -o predictions.json",
        ]
    if kind == "sleep":
        return [f"Done: {result.get('steps', '?')} steps in {human_duration(result.get('slept_s'))}"]
    if kind == "ingest":
        return [
            f"Dataset {result.get('dataset_id')} {result.get('status')}: {result.get('rows')} rows, "
            f"{result.get('invalid_rows')} invalid"
        ]
    return [f"Result: {me} jobs show {job_id}"] if result else []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@jobs.command("cancel")
@click.argument("job_id", type=int)
@api_command
def jobs_cancel(job_id: int) -> None:
    """Cancel a job: queued jobs at once, running jobs at their next checkpoint."""
    job = get_client().cancel(job_id)
    if job["state"] == "cancelled":
        click.echo(f"Job {job_id} cancelled")
    else:
        click.echo(f"Cancel requested: job {job_id} is {job['state']} and stops within seconds")


@jobs.command("delete")
@click.argument("job_id", type=int)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@api_command
def jobs_delete(job_id: int, yes: bool) -> None:
    """Erase a finished job: its events, result, checkpoints and score files (cancel it first)."""
    _confirm(f"Delete job {job_id} with its events, result and files?", yes)
    get_client().delete_job(job_id)
    click.echo(f"Deleted job {job_id}")


def _confirm(question: str, yes: bool) -> None:
    """Ask before erasing unless --yes; anything but yes (or no input at all) aborts, exit 1."""
    if not yes:
        click.confirm(f"{question} This cannot be undone", abort=True)


# -- submit, train, score, download ----------------------------------------------------------


def _after_submit(client: Client, job: dict, watch: bool, output: str | None = None, fmt: str | None = None) -> None:
    click.echo(f"Submitted job {job['id']} ({job['kind']}, {job['state']})")
    if not watch:
        click.echo(f"Follow it with: {command_name()} jobs watch {job['id']}")
        return
    code = watch_job(client, job["id"])
    if code == 0 and output:
        path = client.download_result(job["id"], output, format=fmt)
        click.echo(f"Saved the result to {path}")
    sys.exit(code)


@client.command("submit")
@click.argument("kind")
@click.option("--spec", default="{}", show_default=True, help="the job spec as JSON, or @file.json")
@click.option("--priority", type=click.IntRange(-100, 100), default=0, show_default=True)
@click.option("--idempotency-key", default=None, help="resubmitting with the same key returns the same job")
@click.option("--watch", is_flag=True, help="follow the job until it ends (exit code as `jobs watch`)")
@api_command
def submit(kind: str, spec: str, priority: int, idempotency_key: str | None, watch: bool) -> None:
    """Submit a job of any KIND (train, score, sleep, ...) with a JSON spec."""
    client = get_client()
    job = client.submit_job(kind, _json_option(spec, "--spec"), priority=priority, idempotency_key=idempotency_key)
    _after_submit(client, job, watch)


@client.command("train")
@click.option("--dataset", "dataset_id", type=int, required=True, help="dataset id (sequences or images)")
@click.option("--model-name", required=True, help="registry name; each run adds a version")
@click.option("--arch", type=click.Choice(["rnn", "cnn"]), required=True)
@click.option(
    "--task",
    type=click.Choice(["classification", "multilabel", "regression"]),
    default="classification",
    show_default=True,
)
@click.option("--target", multiple=True, help="label column (repeat for several)")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 65_536), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="auto, cpu or cuda[:N]")
@click.option("--param", "params", multiple=True, help="architecture parameter key=value, e.g. hidden_size=128")
@click.option("--spec", "extra_spec", default=None, help="more spec fields as JSON (split, scheduler, ...)")
@click.option("--watch", is_flag=True, help="follow the job until it ends (exit code as `jobs watch`)")
@api_command
def train(
    dataset_id: int,
    model_name: str,
    arch: str,
    task: str,
    target: tuple[str, ...],
    epochs: int,
    batch_size: int | None,
    lr: float | None,
    seed: int | None,
    device: str | None,
    params: tuple[str, ...],
    extra_spec: str | None,
    watch: bool,
) -> None:
    """Train a model on an uploaded dataset and register it as a new version."""
    client = get_client()
    targets = list(target)
    job = client.train(
        dataset_id=dataset_id,
        model_name=model_name,
        arch=arch,
        task=task,
        target=(targets[0] if len(targets) == 1 else targets) or None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        model=_key_values(params, "--param") or None,
        **_json_option(extra_spec, "--spec"),
    )
    _after_submit(client, job, watch)


@client.command("score")
@click.argument("model")
@click.argument("library_id", type=int)
@click.option("--top-k", type=click.IntRange(0, 10_000), default=None, help="best rows kept in the job result")
@click.option("--output", "output_format", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True)
@click.option(
    "--explain-top-k",
    type=click.IntRange(0, 100),
    default=None,
    help="draw this many of the best rows with their atom attributions (SVG files listed in the result)",
)
@click.option(
    "--coverage", type=click.FloatRange(0.5, 0.99), default=None, help="interval coverage of a calibrated model"
)
@click.option("--watch", is_flag=True, help="follow the job until it ends (exit code as `jobs watch`)")
@click.option(
    "-o",
    "--save",
    "save_to",
    type=click.Path(dir_okay=True, writable=True),
    default=None,
    help="with --watch: save the score file here when done",
)
@api_command
def score(
    model: str,
    library_id: int,
    top_k: int | None,
    output_format: str,
    explain_top_k: int | None,
    coverage: float | None,
    watch: bool,
    save_to: str | None,
) -> None:
    """Score library LIBRARY_ID with MODEL (name, name@version or name@alias).

    The score file has one column per model output, then the model's spread, interval and
    domain columns when it has them."""
    client = get_client()
    job = client.score(
        model, library_id, top_k=top_k, output=output_format, explain_top_k=explain_top_k, coverage=coverage
    )
    _after_submit(client, job, watch, save_to, output_format)


@client.command("download")
@click.argument("job_id", type=int)
@click.option("-o", "--output", required=True, type=click.Path(writable=True), help="file (or directory) to write")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet", "json"]),
    default=None,
    help="for scoring jobs: the file format (default: the job's output)",
)
@api_command
def download(job_id: int, output: str, fmt: str | None) -> None:
    """Save a finished job's result: a scoring job's file (CSV or Parquet, as -o names it or
    --format says), or any job's JSON result (-o result.json). Refuses, writing nothing, when
    the result is not in the format the file name asks for."""
    named = None if Path(output).is_dir() else format_of_name(output)
    if fmt and named and fmt != named:
        raise click.BadParameter(f"--format {fmt} but {output} names a {named} file", param_hint="-o")
    client = get_client()
    try:
        path = client.download_result(job_id, output, format=fmt)
    except MedmaasError as exc:
        if exc.code != "format_mismatch":
            raise
        raise ClientError(_mismatch(client, job_id, exc)) from None
    click.echo(f"Saved job {job_id}'s result to {path} ({path.stat().st_size} bytes)")


def _mismatch(client: Client, job_id: int, exc: MedmaasError) -> str:
    details = exc.details if isinstance(exc.details, dict) else {}
    got, me = details.get("got"), command_name()
    kind = client.get_job(job_id).get("kind", "")
    if got == "json":
        return (
            f"job {job_id} is {_a(kind)} job; its result is JSON, not {details.get('wanted')} — "
            f"use `{me} jobs show {job_id}` or download with -o result.json"
        )
    return f"{exc.message}: download with -o result.{got} (nothing was written)"


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in tuple("aeiou") else f"a {word}"


# -- datasets --------------------------------------------------------------------------------


@client.group("datasets")
def datasets() -> None:
    """Upload and inspect datasets."""


@datasets.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option("--kind", type=click.Choice(["images", "sequences", "library"]), required=True)
@click.option("--name", default=None)
@click.option("--option", "options", multiple=True, help="ingest option key=value, e.g. text_column=smiles")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@click.option(
    "--wait/--no-wait",
    default=True,
    help="a large upload is parsed by a worker job: wait for it (default) or return at once (status processing)",
)
@api_command
def datasets_upload(
    file: str, kind: str, name: str | None, options: tuple[str, ...], as_json: bool, wait: bool
) -> None:
    """Upload FILE (streamed) and print its validation report.

    A large text upload is parsed by a worker job after the upload: by default this waits for
    it (following the job). Exit code 1 when the server could not read the file."""
    client = get_client()
    opts = {}
    for pair in options:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"--option must look like key=value, got {pair!r}")
        opts[key] = value
    size = Path(file).stat().st_size
    if as_json or not sys.stderr.isatty():
        ds = client.upload_dataset(file, kind, name=name, options=opts)
    else:
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True) as bar:
            task = bar.add_task(f"uploading {Path(file).name}", total=size)
            ds = client.upload_dataset(
                file,
                kind,
                name=name,
                options=opts,
                progress=lambda sent, total: bar.update(task, completed=sent, total=total),
            )
            bar.update(task, description="validating on the server")
    if wait and ds.get("status") == "processing":
        if as_json or not sys.stdout.isatty():
            ds = client.wait_dataset(ds["id"])
        else:
            click.echo(f"Dataset {ds['id']} uploaded; job {ds['job_id']} parses it")
            watch_job(client, ds["job_id"])
            ds = client.get_dataset(ds["id"])
    if as_json:
        click.echo(json.dumps(ds, indent=2))
    else:
        _print_dataset(ds)
    if ds.get("status") == "failed":
        sys.exit(1)


def _print_dataset(ds: dict) -> None:
    click.echo(f"Dataset {ds['id']} · {ds['name']} · {ds['kind']}")
    status = ds.get("status") or "ready"
    if status == "processing":
        me = command_name()
        click.echo(f"  status        processing (job {ds.get('job_id')}: `{me} jobs watch {ds.get('job_id')}`)")
    elif status == "failed":
        click.echo(f"  status        failed: {ds.get('error')}")
    click.echo(f"  rows          {ds['rows']}")
    click.echo(f"  invalid rows  {ds['invalid_rows']}")
    click.echo(f"  bytes         {ds['bytes']}")
    click.echo(f"  sha256        {ds['sha256']}")
    for sample in (ds.get("invalid_samples") or [])[:10]:
        where = ", ".join(f"{k} {v}" for k, v in sample.items() if k != "reason")
        click.echo(f"  invalid: {where}: {sample.get('reason', '')}")
    if ds.get("schema"):
        click.echo(f"  schema        {json.dumps(ds['schema'], sort_keys=True)[:500]}")


@datasets.command("list")
@click.option("--kind", type=click.Choice(["images", "sequences", "library"]), default=None)
@api_command
def datasets_list(kind: str | None) -> None:
    """Your datasets, newest first."""
    items = get_client().list_datasets(kind=kind)["items"]
    if not items:
        click.echo("no datasets")
    for ds in items:
        status = ds.get("status") or "ready"
        counts = f"{ds['rows']:>9} rows  {ds['invalid_rows']:>6} invalid" if status == "ready" else f"{status:<31}"
        click.echo(f"{ds['id']:>5}  {ds['kind']:<9}  {counts}  {ds['name']}")


@datasets.command("show")
@click.argument("dataset_id", type=int)
@api_command
def datasets_show(dataset_id: int) -> None:
    """One dataset's validation report."""
    _print_dataset(get_client().get_dataset(dataset_id))


@datasets.command("delete")
@click.argument("dataset_id", type=int)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@api_command
def datasets_delete(dataset_id: int, yes: bool) -> None:
    """Erase a dataset: its upload and validated data (model versions trained on it stay)."""
    _confirm(f"Delete dataset {dataset_id} and its files?", yes)
    get_client().delete_dataset(dataset_id)
    click.echo(f"Deleted dataset {dataset_id}")


# -- models and predict ----------------------------------------------------------------------


@client.group("models")
def models() -> None:
    """The model registry."""


@models.command("list")
@api_command
def models_list() -> None:
    items = get_client().models()
    if not items:
        click.echo("no models")
    for m in items:
        aliases = ", ".join(f"{a}→v{v}" for a, v in sorted(m.get("aliases", {}).items()))
        click.echo(f"{m['name']:<30} latest v{m['latest_version']}  {m['versions']} version(s)  {aliases}")


@models.command("show")
@click.argument("name")
@api_command
def models_show(name: str) -> None:
    detail = get_client().model(name)
    click.echo(f"Model {detail['name']}")
    for alias, version in sorted(detail.get("aliases", {}).items()):
        click.echo(f"  alias {alias} → v{version}")
    for v in detail["versions"]:
        metrics = v.get("metrics") or {}
        test = metrics.get("test") or {}
        summary = " · ".join(f"{k} {_fmt(val)}" for k, val in sorted(test.items()) if isinstance(val, (int, float)))
        click.echo(
            f"  v{v['version']}  {v['arch']} {v['task']}  job {v.get('job_id')}  {v['created_at'][:19]}  "
            f"{('test: ' + summary) if summary else ''}"
        )


@models.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=int)
@api_command
def models_alias(name: str, alias: str, version: int) -> None:
    """Point NAME@ALIAS at VERSION."""
    get_client().set_alias(name, alias, version)
    click.echo(f"{name}@{alias} → version {version}")


@models.command("download")
@click.argument("name")
@click.argument("version", type=int)
@click.option("-o", "--output", required=True, type=click.Path(writable=True))
@click.option("--file", "which", type=click.Choice(["weights", "config"]), default="weights", show_default=True)
@api_command
def models_download(name: str, version: int, output: str, which: str) -> None:
    """Save a version's weights (safetensors) or config (JSON)."""
    path = get_client().download_model_file(name, version, output, which)
    click.echo(f"Saved {name} v{version} {which} to {path}")


@models.command("delete")
@click.argument("name")
@click.option("--version", type=click.IntRange(1), default=None, help="delete only this version")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@api_command
def models_delete(name: str, version: int | None, yes: bool) -> None:
    """Erase model NAME (every version, its weights and aliases), or one --version of it
    (and the aliases pointing at it)."""
    what = f"model {name} (every version, its weights and aliases)" if version is None else f"{name} version {version}"
    _confirm(f"Delete {what}?", yes)
    get_client().delete_model(name, version)
    click.echo(f"Deleted {what.split(' (')[0]}")


@client.command("predict")
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--timeout",
    type=click.FloatRange(0, 300),
    default=None,
    help="seconds the server waits for the predictions before answering with a job (server default 10)",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="when the server answers with a job: follow it and print the predictions, or print the job id",
)
@click.option("--explain", is_flag=True, help="attributions per input, drawn (SMILES: on the molecule; images: PNG)")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, writable=True),
    default=None,
    help="with --explain: write the drawings here as <i>.svg (<i>.png for images), i = the input's position from 1",
)
@click.option("--coverage", type=click.FloatRange(0.5, 0.99), default=None, help="interval coverage (default 0.9)")
@click.option(
    "--uncertainty",
    type=click.Choice(["auto", "mc_dropout", "none"]),
    default=None,
    help="spread from the ensemble (auto), MC dropout, or none",
)
@click.option("--tta", type=click.IntRange(0, 32), default=None, help="SMILES: average over N random SMILES")
@click.option("--prediction-sets", is_flag=True, default=None, help="classification: conformal prediction sets")
@click.option(
    "--json/--table",
    "as_json",
    default=None,
    help="print the API's JSON or a table (default: a table on a terminal, JSON otherwise)",
)
@api_command
def predict(
    model: str,
    inputs: tuple[str, ...],
    timeout: float | None,
    wait: bool,
    explain: bool,
    output_dir: str | None,
    coverage: float | None,
    uncertainty: str | None,
    tta: int | None,
    prediction_sets: bool | None,
    as_json: bool | None,
) -> None:
    """Predict with MODEL (name, name@version, name@alias) for SMILES / token INPUTS.

    Prints the predictions with their spread, interval and domain columns (a table on a
    terminal, JSON when piped or with --json). With --explain -o DIR, each input's drawing
    goes to DIR/<i>.svg (PNG for images). A prediction slower than --timeout runs on as a
    job: by default this waits for it; with --no-wait it prints the job id and how to get
    the predictions later."""
    if output_dir and not explain:
        raise click.BadParameter("-o DIR holds the drawings of --explain; add --explain", param_hint="-o")
    client = get_client()
    options: dict[str, Any] = {
        "explain": explain or None,
        "coverage": coverage,
        "uncertainty": uncertainty,
        "tta": tta,
        "prediction_sets": prediction_sets,
    }
    answer = client.predict(model, list(inputs), timeout=timeout, **options)
    if "predictions" not in answer:
        job_id, me = answer["id"], command_name()
        if not wait:
            click.echo(
                f"Prediction job {job_id} is {answer.get('state', 'queued')}. Follow it with "
                f"`{me} jobs watch {job_id}`; then get the predictions with `{me} download {job_id} -o predictions.json`"
            )
            return
        click.echo(f"Prediction job {job_id} is {answer.get('state', 'queued')}; waiting for it ...", err=True)
        answer = client.predict_result(job_id)
    if output_dir:
        written = save_drawings(answer.get("predictions") or [], Path(output_dir))
        click.echo(f"Saved {len(written)} drawing(s) to {output_dir}", err=True)
    if as_json is None:
        as_json = not sys.stdout.isatty()
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    from rich.console import Console

    Console().print(predictions_table(answer))


def save_drawings(predictions: list[dict], directory: Path) -> list[Path]:
    """Each explained prediction's drawing as directory/<i>.svg or <i>.png (i from 1, the
    input's position); the prediction then names its file (`explanation.file`) in place of
    the inline drawing."""
    import base64

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i, item in enumerate(predictions, start=1):
        explanation = item.get("explanation") if isinstance(item, dict) else None
        if not isinstance(explanation, dict):
            continue
        if "svg" in explanation:
            path = directory / f"{i}.svg"
            path.write_text(explanation.pop("svg"), encoding="utf-8")
        elif "png_base64" in explanation:
            path = directory / f"{i}.png"
            path.write_bytes(base64.b64decode(explanation.pop("png_base64")))
        else:
            continue
        for per_output in (explanation.get("outputs") or {}).values():  # the lead output's is saved above
            per_output.pop("svg", None)
            per_output.pop("png_base64", None)
        explanation["file"] = str(path)
        written.append(path)
    return written


def _values(item: dict) -> str:
    """What was predicted, in a few words: the value(s), or the label and its probability."""
    if "label" in item:
        p = (item.get("probabilities") or {}).get(item["label"])
        return f"{item['label']} ({_fmt(p)})" if p is not None else str(item["label"])
    if "labels" in item:
        return ", ".join(item["labels"]) or "none"
    values = item.get("values") or {}
    if len(values) == 1:
        return _fmt(next(iter(values.values())))
    return " · ".join(f"{k} {_fmt(v)}" for k, v in values.items())


def _spread(item: dict) -> str:
    unc = item.get("uncertainty") or {}
    std = unc.get("std") or {}
    if not std:
        return ""
    shown = _fmt(next(iter(std.values()))) if len(std) == 1 else " · ".join(f"{k} {_fmt(v)}" for k, v in std.items())
    return f"±{shown} ({unc.get('method')})" if unc.get("method") else f"±{shown}"


def _interval(item: dict) -> str:
    interval = item.get("interval") or {}
    values = interval.get("values") or {}
    spans = [f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in values.values()]
    if "prediction_set" in item:
        spans.append("{" + ", ".join(map(str, item["prediction_set"])) + "}")
    return " · ".join(spans)


def _domain(item: dict) -> str:
    domain = item.get("domain") or {}
    if "in_domain" not in domain:
        return ""
    measure = domain.get("nn_similarity", domain.get("nn_distance"))
    return f"{'in' if domain['in_domain'] else 'OUT'} ({_fmt(measure)})"


def predictions_table(answer: dict) -> Any:
    """The predictions as a rich Table: input, canonical SMILES, prediction, spread,
    interval (or prediction set), domain, drawing file, error; columns nobody has are left out."""
    from rich.table import Table

    items = [p if isinstance(p, dict) else {} for p in answer.get("predictions") or []]
    coverage = next((p["interval"].get("coverage") for p in items if isinstance(p.get("interval"), dict)), None)
    columns: list[tuple[str, Callable[[dict], str]]] = [
        ("#", lambda p: ""),
        ("input", lambda p: str(p.get("input", ""))),
        ("SMILES", lambda p: str(p.get("smiles", ""))),
        ("prediction", lambda p: "" if "error" in p else _values(p)),
        ("spread", _spread),
        (f"{round(100 * coverage)}% interval" if coverage else "interval / set", _interval),
        ("domain", _domain),
        ("drawing", lambda p: str((p.get("explanation") or {}).get("file", ""))),
        ("error", lambda p: str(p.get("error", ""))),
    ]
    cells = [[get(p) for _, get in columns] for p in items]
    keep = [j for j in range(len(columns)) if j < 2 or any(row[j] for row in cells)]
    table = Table(header_style="bold", title=f"{answer.get('model')} v{answer.get('version')}")
    for j in keep:
        table.add_column(columns[j][0], overflow="fold", justify="right" if j == 0 else "left")
    for i, row in enumerate(cells, start=1):
        table.add_row(*[str(i) if j == 0 else row[j] for j in keep])
    return table


import medmaas.cmd_lifecycle  # noqa: E402, F401  (jobs tag/compare/clone, models tag/card)
from medmaas import cmd_onnx  # noqa: E402, F401  (registers `models export` on the models group)
