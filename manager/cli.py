"""`titan-plugins`: the operator's command line, a thin client of the REST API."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from manager.cli_local import new, run_local, validate

TERMINAL = {"succeeded", "failed", "timeout", "oom", "output_limit", "rejected", "lost"}


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url.rstrip("/"), token

    def call(self, method: str, path: str, body: bytes | None = None,
             ok: tuple[int, ...] = (200, 202)) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=660) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            data = json.loads(exc.read() or b"{}")
            if exc.code in ok:
                return exc.code, data
            err = data.get("error", {})
            detail = f"\n  details: {json.dumps(err['details'])}" if err.get("details") else ""
            raise click.ClickException(f"{err.get('code', exc.code)}: "
                                       f"{err.get('message', exc.reason)}{detail}") from None
        except urllib.error.URLError as exc:
            raise click.ClickException(f"cannot reach the API at {self.url}: {exc.reason} "
                                       "(is it up? try: make up)") from None


def read_event(value: str) -> bytes:
    """-e takes JSON text, @file, or @- (standard input)."""
    if value == "@-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc.strerror}") from None
    return value.encode()


def out(ctx: click.Context, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if ctx.obj["json"] else text)


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def describe(rec: dict[str, Any]) -> str:
    lines = [f"invocation {rec['invocation_id']}  plugin {rec.get('plugin')}@"
             f"{rec.get('version')}  status {rec.get('status')}"]
    for key in ("reason", "exit_code", "duration_s", "attempts", "worker", "result_event_ids"):
        if rec.get(key) not in (None, "", []):
            lines.append(f"  {key}: {rec[key]}")
    for stream in ("stdout", "stderr"):
        if rec.get(stream):
            lines.append(f"  {stream}:\n    " + rec[stream].rstrip()[:4000].replace("\n", "\n    "))
    return "\n".join(lines)


@click.group()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--api", default=lambda: os.environ.get("TITAN_API_URL", "http://localhost:8003"),
              show_default="$TITAN_API_URL or http://localhost:8003")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, api: str) -> None:
    """Titan Plugin Manager: list, trigger and inspect sandboxed plugins."""
    ctx.obj = {"json": as_json, "api": Api(api, os.environ.get("TITAN_API_TOKEN")),
               "out": lambda data, text: out(ctx, data, text)}


@cli.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Plugins, their status, version and triggers."""
    _, data = ctx.obj["api"].call("GET", "/plugins")
    rows = [[p["name"], p["status"], p["version"], (p["digest"] or "")[7:19],
             ", ".join(f"{t['topic']}/{t['event_type']}" for t in p["triggers"]),
             "; ".join(p["errors"])] for p in data["plugins"]]
    out(ctx, data, table(rows, ["NAME", "STATUS", "VERSION", "DIGEST", "TRIGGERS", "ERRORS"]))
    if any(p["status"] != "loaded" for p in data["plugins"]):
        sys.exit(1)


@cli.command()
@click.argument("name")
@click.option("-e", "--event", "event", required=True, help="Event JSON, or @file.")
@click.option("--wait", "wait", type=float, is_flag=False, flag_value=60.0, default=None,
              help="Wait for the result (seconds, default 60).")
@click.pass_context
def trigger(ctx: click.Context, name: str, event: str, wait: float | None) -> None:
    """Run plugin NAME on an event, regardless of its triggers."""
    query = f"?wait={wait}" if wait else ""
    status, data = ctx.obj["api"].call("POST", f"/plugins/{name}/trigger{query}",
                                       read_event(event))
    if status == 200:
        out(ctx, data, describe(data))
        if data["status"] != "succeeded":
            sys.exit(1)
    else:
        out(ctx, data, f"queued invocation {data['invocation_id']} "
                       f"(see: titan-plugins show {data['invocation_id']})")
        if wait:
            sys.exit(1)  # still not finished after --wait


@cli.command()
@click.option("-e", "--event", "event", required=True, help="Event JSON, or @file.")
@click.pass_context
def publish(ctx: click.Context, event: str) -> None:
    """Publish an event to the bus (plugins whose triggers match will run)."""
    _, data = ctx.obj["api"].call("POST", "/events", read_event(event))
    out(ctx, data, f"published {data['event_id']} as stream entry {data['entry_id']}")


@cli.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Rediscover plugins/ and report what changed."""
    _, data = ctx.obj["api"].call("POST", "/plugins/reload")
    text = [f"{k}: {', '.join(i if isinstance(i, str) else i['name'] for i in v) or '-'}"
            for k, v in data.items()]
    text += [f"  {r['name']}: {'; '.join(r['errors'])}" for r in data["rejected"]]
    out(ctx, data, "\n".join(text))


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


def log_entry(rec: dict[str, Any]) -> str:
    """One run as `logs` shows it: a status line, then the plugin's log (stderr)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("created_at") or 0))
    head = f"{when}  {rec['invocation_id']}  {rec['status']}"
    if rec.get("duration_s") is not None:
        head += f"  {rec['duration_s']}s"
    if rec.get("reason"):
        head += f"  {rec['reason']}"
    stderr = (rec.get("stderr") or "").rstrip()
    return head + ("\n  " + stderr[-4000:].replace("\n", "\n  ") if stderr else "")


@cli.command()
@click.argument("name")
@click.option("-n", "limit", default=10, show_default=True, help="How many runs.")
@click.option("-f", "follow", is_flag=True, help="Keep printing new runs.")
@click.pass_context
def logs(ctx: click.Context, name: str, limit: int, follow: bool) -> None:
    """Recent runs of plugin NAME, oldest first: status line, then the plugin's stderr."""
    seen: set[str] = set()
    while True:
        _, data = ctx.obj["api"].call("GET", f"/plugins/{name}/invocations?limit={limit}")
        for rec in reversed(data["invocations"]):
            if rec["invocation_id"] not in seen and (not follow or rec["status"] in TERMINAL):
                seen.add(rec["invocation_id"])
                out(ctx, rec, log_entry(rec))
        if not follow:
            return
        time.sleep(1)


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
        sys.exit(1)


cli.add_command(validate)
cli.add_command(new)
cli.add_command(run_local)


def main() -> None:
    cli()
