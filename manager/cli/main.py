"""`titan-plugins`: the operator's command line, a thin client of the REST API (and, for
`new`, `run` and `validate`, of the local code; see manager/cli/local.py).

Exit codes: 0 ok; 1 the run (or the check) failed, or the API refused; 2 usage; 3 no such
plugin or invocation (a plugin with the nearest names); 4 the API is unreachable; 5 a
`--wait` timed out. With `--json` (before or after the command)
every output is valid JSON on stdout (JSON Lines for `logs -f`), errors included.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from manager.cli.client import (
    EXIT_FAILED,
    EXIT_WAIT,
    Api,
    api_token,
    default_api,
    poll_record,
    read_event,
)
from manager.cli.publish import publish
from manager.cli.secret_commands import secret
from manager.cli.text import (
    describe,
    log_entry,
    plugin_table,
    reload_text,
    table,
    versions_text,
)
from manager.cli.waits import Progress, command_name, ran_out
from manager.core.records import TERMINAL

FOLLOW_WINDOW = 100  # runs read on each poll of `logs -f`
FOLLOW_POLL_S = 0.5


def out(ctx: click.Context, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if ctx.obj["json"] else text)


class Cli(click.Group):
    """Accepts the global --json after the command name too, and imports the author's local
    commands (the plugin loader, Docker) only when one of them runs: the API commands
    answer without loading any of it."""

    LAZY = {"new": "new", "run": "run_local", "validate": "validate",  # manager.cli.local
            "schedule": "schedule"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY, "tls"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "tls":  # the CA (manager.cli.tls), for make up and the operator
            from manager.cli.tls import tls

            return tls
        if name in self.LAZY:
            from manager.cli import local

            command: click.Command = getattr(local, self.LAZY[name])
            return command
        return super().get_command(ctx, name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--json" in args[1:]:
            args = ["--json", *[a for a in args if a != "--json"]]
        return super().parse_args(ctx, args)


@click.group(cls=Cli)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--api", default=default_api,
              show_default="$TITAN_API_URL, or the socket run/api.sock")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, api: str) -> None:
    """Titan Plugin Manager: list, trigger and inspect sandboxed plugins."""
    ctx.obj = {"json": as_json, "api": Api(api, api_token()),
               "out": lambda data, text: out(ctx, data, text)}


@cli.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Plugins, their status, version and triggers (invalid ones marked, rolled-back ones
    noted)."""
    _, data = ctx.obj["api"].call("GET", "/plugins")
    out(ctx, data, plugin_table(data))


@cli.command()
@click.argument("name")
@click.option("-e", "--event", "event", required=True, help="Event JSON, @file, or @-.")
@click.option("--wait", "wait", type=click.FloatRange(0, 600, min_open=True), is_flag=False,
              flag_value=60.0, default=None, help="Wait for the result (seconds, default 60).")
@click.pass_context
def trigger(ctx: click.Context, name: str, event: str, wait: float | None) -> None:
    """Run plugin NAME on an event, regardless of its triggers. With --wait, exits 0 when
    the run succeeded, 1 when it failed, 5 when it had not finished in time."""
    api: Api = ctx.obj["api"]
    terminal = wait and not ctx.obj["json"] and sys.stderr.isatty()
    query = f"?wait={wait}" if wait and not terminal else ""  # a terminal is shown progress
    deadline = time.monotonic() + (wait or 0)
    status, data = api.call("POST", f"/plugins/{name}/trigger{query}", read_event(event))
    if status == 202 and wait and not data.get("waited"):  # a terminal, or no waiting slot
        progress = Progress.for_terminal(api, data["invocation_id"], ctx.obj["json"])
        status, data = poll_record(api, data, deadline, progress)
        if progress is not None:
            progress.clear()
    if status == 200:
        out(ctx, data, describe(data))
        if data["status"] != "succeeded":
            sys.exit(EXIT_FAILED)
        return
    if wait:  # where the run stands now, told alike on stdout and stderr
        data = {**data, "status": ran_out(ctx.obj["api"], data["invocation_id"], wait)}
    out(ctx, data, f"{data['status']}: invocation {data['invocation_id']} "
                   f"(see: {command_name()} show {data['invocation_id']})")
    if wait:
        sys.exit(EXIT_WAIT)


@cli.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Rediscover plugins/ and report what changed. Exits 1 when a plugin was rejected
    (an invalid plugin, or an edit of one that keeps its old version serving)."""
    _, data = ctx.obj["api"].call("POST", "/plugins/reload")
    out(ctx, data, reload_text(data))
    if data["rejected"]:
        names = ", ".join(r["name"] for r in data["rejected"])
        click.echo(f"{len(data['rejected'])} plugin(s) rejected: {names} "
                   "(`validate NAME` shows why)", err=True)
        sys.exit(EXIT_FAILED)


@cli.command()
@click.argument("name")
@click.pass_context
def versions(ctx: click.Context, name: str) -> None:
    """The kept versions of plugin NAME, newest first (* serves now; `rollback NAME
    VERSION` puts one back)."""
    _, data = ctx.obj["api"].call("GET", f"/plugins/{name}")
    out(ctx, data["versions"], versions_text(data))


@cli.command()
@click.argument("name")
@click.argument("version", required=False)
@click.pass_context
def rollback(ctx: click.Context, name: str, version: str | None) -> None:
    """Put VERSION (a version or digest; default: the previous one) of NAME back in service."""
    body = json.dumps({"version": version} if version else {}).encode()
    _, data = ctx.obj["api"].call("POST", f"/plugins/{name}/rollback", body)
    out(ctx, data, f"{name}: {data['from']['version']} ({data['from']['digest'][7:19]}) -> "
                   f"{data['to']['version']} ({data['to']['digest'][7:19]})")


@cli.command()
@click.argument("invocation_id")
@click.pass_context
def show(ctx: click.Context, invocation_id: str) -> None:
    """One invocation record."""
    _, data = ctx.obj["api"].call("GET", f"/invocations/{invocation_id}")
    out(ctx, data, describe(data))


def runs_of(api: Api, name: str, limit: int) -> list[dict[str, Any]]:
    """The plugin's latest runs, oldest first."""
    _, data = api.call("GET", f"/plugins/{name}/invocations?limit={limit}")
    return sorted(data["invocations"], key=lambda r: r.get("created_at") or 0)


@cli.command()
@click.argument("name")
@click.option("-n", "limit", default=10, show_default=True, help="How many runs.")
@click.option("-f", "follow", is_flag=True, help="Then print each new run as it finishes.")
@click.pass_context
def logs(ctx: click.Context, name: str, limit: int, follow: bool) -> None:
    """Recent runs of plugin NAME, oldest first: status line, the result events, then the
    plugin's stderr. With -f, the last N in time order, then each new run once, when it
    has finished (JSON Lines with --json)."""
    api, as_json = ctx.obj["api"], ctx.obj["json"]
    if not follow:
        runs = runs_of(api, name, limit)
        out(ctx, runs, "\n".join(log_entry(r) for r in runs) or f"no runs of {name} yet")
        return
    known = runs_of(api, name, max(limit, FOLLOW_WINDOW))
    unfinished = set()
    for rec in known[-limit:] if limit > 0 else []:
        click.echo(json.dumps(rec) if as_json else log_entry(rec))
        if rec["status"] not in TERMINAL:
            unfinished.add(rec["invocation_id"])  # printed again once it finishes
    seen = {r["invocation_id"] for r in known}
    while True:
        time.sleep(FOLLOW_POLL_S)
        for rec in runs_of(api, name, FOLLOW_WINDOW):
            new = rec["invocation_id"] not in seen
            if new or rec["invocation_id"] in unfinished:
                seen.add(rec["invocation_id"])
                if rec["status"] in TERMINAL:
                    unfinished.discard(rec["invocation_id"])
                    click.echo(json.dumps(rec) if as_json else log_entry(rec))
                else:
                    unfinished.add(rec["invocation_id"])


@cli.command()
@click.pass_context
def health(ctx: click.Context) -> None:
    """Redis, Docker engine and workers; exit 1 when unhealthy."""
    _, data = ctx.obj["api"].call("GET", "/health", ok=(200, 503))
    rows = [[part, "ok" if data[part]["ok"] else "DOWN",
             json.dumps({k: v for k, v in data[part].items() if k != "ok"})]
            for part in ("redis", "docker", "workers")]
    out(ctx, data, table(rows, ["PART", "STATE", "DETAILS"]))
    if data["status"] != "ok":
        sys.exit(EXIT_FAILED)


@cli.group(invoke_without_command=True)
@click.option("-n", "limit", default=20, show_default=True, help="How many, newest first.")
@click.pass_context
def dead(ctx: click.Context, limit: int) -> None:
    """Dead letters: rejected events with their reason (see also: dead replay ID)."""
    if ctx.invoked_subcommand:
        return
    _, data = ctx.obj["api"].call("GET", f"/events/dead?limit={limit}")
    text = "\n".join(f"{d['id']}  {d['reason']}  {d['detail']}\n  "
                     f"{json.dumps(d['event'])[:300]}" for d in data["dead"])
    out(ctx, data, text or "no dead letters")


@dead.command()
@click.argument("entry_id")
@click.pass_context
def replay(ctx: click.Context, entry_id: str) -> None:
    """Publish dead letter ENTRY_ID again (after fixing what rejected it)."""
    _, data = ctx.obj["api"].call("POST", f"/events/dead/{entry_id}/replay")
    out(ctx, data, f"replayed {entry_id} as {data['event_id']} (stream entry {data['entry_id']})")


cli.add_command(publish)
cli.add_command(secret)


def main() -> None:
    """Runs the CLI; errors go to stderr, or as JSON to stdout with --json."""
    as_json = "--json" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(EXIT_FAILED)
    except click.ClickException as exc:
        code = getattr(exc, "code", "usage" if isinstance(exc, click.UsageError) else "error")
        message = getattr(exc, "detail_message", exc.format_message())
        if as_json:
            click.echo(json.dumps({"error": {"code": code, "message": message,
                                             "details": getattr(exc, "details", None)}}))
        else:
            exc.show()
        sys.exit(exc.exit_code)
