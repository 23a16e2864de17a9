"""`titan-plugins.py secret set|list|rm`: the operator's secrets, through the API. A value
is read from stdin or a file, never from the command line (which every local account
can read in /proc), and never printed."""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys

import click

from manager.cli.client import CliError


def out(ctx: click.Context, data: object, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if ctx.obj["json"] else text)


@click.group()
def secret() -> None:
    """Secrets plugins read as files at /run/secrets/NAME (values are never shown)."""


@secret.command("set")
@click.argument("name")
@click.option("--plugin", "plugins", multiple=True, required=True,
              help="A plugin whose runs may read it (repeat for more).")
@click.option("--from-file", "from_file", type=click.File("rb"),
              help="Read the value from this file instead of stdin.")
@click.pass_context
def set_(ctx: click.Context, name: str, plugins: tuple[str, ...], from_file: object) -> None:
    """Set (or rotate) secret NAME, its value read from stdin, and bind it to plugins."""
    from manager.core.secrets import SecretError, check_name  # (cryptography: only here)

    try:
        check_name(name)
    except SecretError as exc:
        raise CliError(exc.code, exc.message) from None
    source = from_file if from_file is not None else sys.stdin.buffer
    if from_file is None and sys.stdin.isatty():
        click.echo(f"value of {name} (then Ctrl-D): ", err=True, nl=False)
    value = source.read()  # type: ignore[attr-defined]
    if from_file is None and value.endswith(b"\n") and value.count(b"\n") == 1:
        value = value[:-1]  # `echo value |` and a typed line end with one newline
    if not value:
        raise CliError("invalid_secret", f"secret {name!r}: the value is empty")
    body = {"value": base64.b64encode(value).decode(), "encoding": "base64",
            "plugins": list(plugins)}
    _, data = ctx.obj["api"].call("PUT", f"/secrets/{name}", json.dumps(body).encode())
    unknown = (f" (no plugin is named {', '.join(data['unknown_plugins'])} yet)"
               if data.get("unknown_plugins") else "")
    out(ctx, data, f"set {name}: {data['size']} bytes, for {', '.join(data['plugins'])}"
                   f"{unknown}")


@secret.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Every secret: name, size, the plugins bound, when it changed."""
    _, data = ctx.obj["api"].call("GET", "/secrets")
    lines = [f"{s['name']:24s} {s['size']:6d} B  "
             f"{dt.datetime.fromtimestamp(s['changed_at'], dt.UTC):%Y-%m-%d %H:%M:%S}Z  "
             f"{', '.join(s['plugins'])}" for s in data["secrets"]]
    out(ctx, data, "\n".join(lines) or "no secrets")


@secret.command("rm")
@click.argument("name")
@click.pass_context
def rm(ctx: click.Context, name: str) -> None:
    """Remove secret NAME (runs of plugins that list it then fail, naming it)."""
    _, data = ctx.obj["api"].call("DELETE", f"/secrets/{name}")
    out(ctx, data, f"removed {name}")
