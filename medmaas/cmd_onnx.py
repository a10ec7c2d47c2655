"""`medmaas models export NAME[@VERSION] -o model.onnx`: a model version's ONNX export.

VERSION is a version number or an alias; without it, the latest version. The file comes
from GET /api/v1/models/{name}/versions/{v}/onnx (app/api/onnx.py); what the graph takes and
returns is in `medmaas models show` metrics (`onnx`) and in the file's metadata. Like the
other client commands this imports only click and the HTTP client (registered on the
`models` group by medmaas.commands)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import click

from medmaas import commands
from medmaas.client import Client, MedmaasError, _attachment_name, _save_stream
from medmaas.commands import ClientError, api_command, models


def resolve_version(client: Client, ref: str) -> tuple[str, int]:
    """NAME, NAME@3 or NAME@alias -> (name, version number); latest when none is given."""
    name, _, which = ref.partition("@")
    if not name:
        raise ClientError(f"Give a model as NAME or NAME@VERSION (a number or an alias), not {ref!r}")
    if which.isdigit():
        return name, int(which)
    detail = client.model(name)
    if which:
        aliases = detail.get("aliases") or {}
        if which not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise ClientError(f"Model {name} has no version or alias {which!r} (aliases: {known})")
        return name, int(aliases[which])
    return name, max(int(v["version"]) for v in detail["versions"])


def download_onnx(client: Client, name: str, version: int, dest: Path) -> Path:
    resp = client.request(
        "GET",
        f"/api/v1/models/{quote(name, safe='')}/versions/{int(version)}/onnx",
        stream=True,
        timeout=(client.timeout, 300),
    )
    if dest.is_dir():
        dest = dest / (_attachment_name(resp) or f"{name}-v{version}.onnx")
    return _save_stream(resp, dest)


@models.command("export")
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("-o", "--output", required=True, type=click.Path(writable=True, path_type=Path), help="file or directory")
@api_command
def models_export(ref: str, output: Path) -> None:
    """Save a version's ONNX export (checked against PyTorch within 1e-4 when it was made)."""
    client = commands.get_client()
    name, version = resolve_version(client, ref)
    try:
        path = download_onnx(client, name, version, output)
    except MedmaasError as exc:
        if exc.code == "onnx_not_exported":
            raise ClientError(exc.message) from None
        raise
    info = (client.model_version(name, version).get("metrics") or {}).get("onnx") or {}
    checked = f" (opset {info['opset']}, max |ONNX - PyTorch| {info['max_abs_diff']:.1e})" if "opset" in info else ""
    click.echo(f"Saved {name} v{version} as ONNX to {path}{checked}")
