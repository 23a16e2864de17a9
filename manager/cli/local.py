"""The author's local commands: `new`, `run` and `validate`. They need no Redis and no
running stack; `run` uses the same sandbox and execution code as the workers."""

from __future__ import annotations

import difflib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from manager.cli.client import EXIT_NOT_FOUND, CliError, read_event
from manager.core.config import Settings
from manager.core.errors import EventError, SandboxUnavailable
from manager.core.events import Event
from manager.core.groups import RuntimeSettings
from manager.core.runs import RunRequest
from manager.plugins.discovery import discover
from manager.plugins.engines import Engines, image_warning, runtime_warning
from manager.plugins.loader import PluginEntry, PluginStatus, load_plugin


def local_engine(settings: Settings) -> Engines:
    """Images and runtimes of the local engine (None each when there is no engine)."""
    import requests
    from docker.errors import DockerException

    from workers.engine import Engine

    try:
        engine = Engine(settings.engine)
        return Engines(set(engine.images()), set(engine.runtimes()))
    except (SandboxUnavailable, DockerException, requests.RequestException):
        return Engines(None, None)


def checked(entry: PluginEntry, engine: Engines, runtime: RuntimeSettings) -> PluginEntry:
    where = "this machine's Docker engine"
    warnings = tuple(w for w in (
        image_warning(entry, engine.images, runtime, where),
        runtime_warning(entry, engine.runtimes, runtime, f"{where} lacks")) if w)
    return replace(entry, warnings=warnings) if warnings else entry


DRAFT_NOTE = ("a draft: reloads leave it out of service; when it is ready, delete the line "
              "`draft: true` from {path}/plugin.yaml")


def entry_line(entry: PluginEntry) -> str:
    problems = [*entry.errors, *(f"warning: {w}" for w in entry.warnings)]
    head = f"{entry.name}: {entry.status.value} {entry.version or ''} {entry.digest or ''}"
    if entry.status is PluginStatus.DRAFT:
        problems.insert(0, DRAFT_NOTE.format(path=_shown(Path(entry.path))))
    return head.rstrip() + "".join(f"\n  {p}" for p in problems)


def plugin_dir(value: str, plugins_dir: Path) -> Path:
    """A plugin directory given as a path, or as a bare name under the plugins directory;
    a name that is neither gets the nearest plugin names (exit code 3)."""
    path = Path(value)
    if path.is_dir():
        return path
    if "/" not in value and (plugins_dir / value).is_dir():
        return plugins_dir / value
    names = sorted(p.name for p in plugins_dir.iterdir() if p.is_dir()) \
        if plugins_dir.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=3)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise CliError("plugin_not_found", f"{value} is not a plugin directory, nor a plugin "
                   f"under {_shown(plugins_dir)}/{hint}", EXIT_NOT_FOUND,
                   details={"suggestions": close})


@click.command()
@click.argument("directory", required=False)
@click.option("--all", "every", is_flag=True, help="Every plugin under DIRECTORY (default: "
              "the plugins directory).")
@click.pass_context
def validate(ctx: click.Context, directory: str | None, every: bool) -> None:
    """Check a plugin (a directory, or a name under the plugins directory), or all of them,
    by the rules a reload applies."""
    settings = Settings.from_env()
    engine = local_engine(settings)
    if every:
        root = Path(directory) if directory else settings.plugins_dir
        if not root.is_dir():
            raise click.BadParameter(f"{directory} is not a directory")
        found = discover(root.resolve(), settings.plugin).found
        entries = [checked(e, engine, settings.runtime) for e, _ in found.values()]
    else:
        if directory is None:
            raise click.UsageError("give a plugin DIRECTORY, or --all")
        path = plugin_dir(directory, settings.plugins_dir)
        entry = load_plugin(path.resolve(), settings.plugin)[0]
        entries = [checked(entry, engine, settings.runtime)]
    data: Any = [e.public() for e in entries] if every else entries[0].public()
    ctx.obj["out"](data, "\n".join(entry_line(e) for e in entries))
    if not entries or any(not e.valid for e in entries):
        sys.exit(1)


@click.command()
@click.argument("name")
@click.option("--topic", default="example.v1", show_default=True)
@click.option("--event-type", default="example", show_default=True)
@click.option("--every", default=None, help="A timer plugin: every 30s, 5m, 1h or 1d.")
@click.option("--schedule", "cron", default=None,
              help="A timer plugin on a cron line (\"0 * * * *\", @daily).")
@click.option("--dir", "plugins_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to create it (default: the plugins directory).")
@click.pass_context
def new(ctx: click.Context, name: str, topic: str, event_type: str, every: str | None,
        cron: str | None, plugins_dir: Path | None) -> None:
    """Create plugins/NAME: a commented plugin.yaml, main.py, a sample event, a README.
    With --every or --schedule, a plugin on a timer (its results go to TOPIC)."""
    from manager.plugins.scaffold import scaffold, timer_clock

    settings = Settings.from_env()
    try:
        target = scaffold(plugins_dir or settings.plugins_dir, name, topic, event_type, settings,
                          timer_clock(every, cron))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    entry, _ = load_plugin(target, settings.plugin)
    rel = _shown(target)
    text = (f"created {rel}/ (plugin.yaml, main.py, event.json, README.md): "
            f"{entry.status.value}\nnext:\n"
            f"  python3 titan-plugins.py run {rel} -e @{rel}/event.json\n"
            f"  {DRAFT_NOTE.format(path=rel)}, then:\n"
            f"  python3 titan-plugins.py reload")
    ctx.obj["out"]({"path": str(target), **entry.public()}, text + "".join(
        f"\n  error: {e}" for e in entry.errors))
    if not entry.valid:
        sys.exit(1)


@click.command("run")
@click.argument("directory")
@click.option("-e", "--event", "event", required=True, help="Event JSON, @file, or @- (stdin).")
@click.pass_context
def run_local(ctx: click.Context, directory: str, event: str) -> None:
    """Run a plugin (a directory, or a name under the plugins directory) once, locally, in
    the same sandbox as a worker (no Redis)."""
    settings = Settings.from_env()
    entry, bundle = load_plugin(plugin_dir(directory, settings.plugins_dir).resolve(),
                                settings.plugin)
    if not entry.valid or entry.manifest is None or bundle is None:
        raise click.ClickException(entry_line(entry))
    try:
        ev = Event.decode(read_event(event))
    except EventError as exc:
        raise click.BadParameter(exc.message, param_hint="-e") from None
    req = entry.request(ev, settings.plugin, "cli")
    if req.net_allow or req.secrets:  # the stack's proxy and secret store give them
        click.echo("note: a local run has no network and no secrets (permissions.net and "
                   "secrets: are given by the stack: publish or trigger)", err=True)
        req = replace(req, net_allow=(), secrets=())
    report = _execute(req, bundle, settings)
    ctx.obj["out"](report, _describe(report))
    if report["status"] != "succeeded":
        sys.exit(1)


def _execute(req: RunRequest, bundle: bytes, settings: Settings) -> dict[str, Any]:
    """The attempt a worker makes (workers.attempt: prepare, execute, classify), without
    Redis: nothing is claimed or stored, nothing is given (no grant, no secrets), and the
    container is always cold."""
    from workers.attempt import Ran, Unavailable, attempt
    from workers.engine import Engine
    from workers.plugin_cache import PluginCache

    t0 = time.monotonic()
    tried = attempt(req, settings, Engine(settings.engine), PluginCache(None, settings.cache),
                    bundle=bundle)
    if isinstance(tried, Unavailable):
        raise click.ClickException(f"sandbox_unavailable: {tried.why} (is a Docker engine "
                                   "running? make up starts one)")
    ended = tried.concluded(req, settings.output) if isinstance(tried, Ran) else tried
    report: dict[str, Any] = {
        "invocation_id": req.invocation_id, "status": ended.status.value,
        "reason": ended.reason, "results": [json.loads(e) for e in ended.events]}
    if ended.ran is not None:
        ran = ended.ran
        report.update(exit_code=ran.exit_code, signal=ran.signal,
                      duration_s=round(ran.duration_s, 3),
                      container_start_s=round(ran.ready_s, 3),
                      total_s=round(time.monotonic() - t0, 3),
                      stdout=ran.stdout.decode("utf-8", "replace"),
                      stderr=ran.stderr.decode("utf-8", "replace"))
    return report


def _describe(report: dict[str, Any]) -> str:
    lines = [f"status {report['status']}" + (f": {report['reason']}" if report.get("reason")
                                             else "")]
    if "exit_code" in report:
        lines.append(f"exit code {report['exit_code']}, container {report['duration_s']}s "
                     f"(start {report['container_start_s']}s), total {report['total_s']}s")
    for event in report["results"]:
        lines.append(f"result {event['topic']}/{event['event_type']}: "
                     f"{json.dumps(event['payload'])[:2000]}")
    if report.get("stderr"):
        lines.append("stderr:\n  " + report["stderr"].rstrip()[:4000].replace("\n", "\n  "))
    if report["status"] != "succeeded" and report.get("stdout"):
        lines.append("stdout:\n  " + report["stdout"].rstrip()[:2000].replace("\n", "\n  "))
    return "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@click.command()
@click.argument("spec")
@click.option("--next", "count", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="How many fire times to show.")
@click.option("--timezone", default="UTC", show_default=True, help="An IANA time zone.")
@click.pass_context
def schedule(ctx: click.Context, spec: str, count: int, timezone: str) -> None:
    """Preview a timer: the next fire times of SPEC, cron ("*/5 * * * *", six fields with
    seconds first, or @hourly) or an interval ("30s", "5m"), as plugin.yaml would take it."""
    from pydantic import ValidationError

    from manager.core.events import rfc3339
    from manager.plugins.schedule import schedule_of
    from manager.plugins.yaml_strict import plain

    try:
        timer = schedule_of(spec, timezone)
    except ValidationError as exc:
        raise click.BadParameter("; ".join(plain(e) for e in exc.errors()),
                                 param_hint="SPEC") from None
    times = [rfc3339(t) for t in timer.next_times(time.time(), count)]
    ctx.obj["out"]({"spec": timer.spec, "timezone": timezone, "next": times},
                   f"{timer.spec} ({timezone}), next {count}:\n" + "\n".join(
                       f"  {t}" for t in times))
