"""`publish`: an event onto the bus, and with `--wait`, what became of it: each matching
plugin's run to its end, a duplicate named as the earlier run it is (the event_id already
ran that plugin), or the reason it was dead-lettered."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from manager.cli.client import (
    EXIT_FAILED,
    EXIT_NO_MATCH,
    EXIT_WAIT,
    Api,
    poll_record,
    read_event,
)
from manager.cli.nomatch import why_nothing
from manager.cli.waits import Progress, queued_s, ran_out
from manager.core.records import shown_payload
from manager.core.retry import CLI_ENTRY_POLL


def wait_handled(api: Api, entry_id: str, deadline: float) -> dict[str, Any] | None:
    """The listener's account of the entry, once it has handled it (None: not in time)."""
    for delay in CLI_ENTRY_POLL.delays():
        _, outcome = api.call("GET", f"/events/entries/{entry_id}")
        if outcome["handled"] or time.monotonic() >= deadline:
            return outcome if outcome["handled"] else None
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
    raise AssertionError("unreachable: the delays never end")


def run_line(run: dict[str, Any], record: dict[str, Any] | None, event_id: str) -> str:
    if run["duplicate"]:
        return (f"  {run['plugin']}: duplicate of run {run['invocation_id']} (event "
                f"{event_id} already ran it; publish without an event_id, or with a new "
                "one, to run it again)")
    status = record["status"] if record else "queued"
    line = f"  {run['plugin']}: {status}  {run['invocation_id']}"
    if record and queued_s(record) is not None:
        line += f"  queued {queued_s(record)}s"
    if record and record.get("duration_s") is not None:
        line += f"  ran {record['duration_s']}s"
    if record and record.get("reason"):
        line += f"  {record['reason']}"
    for r in (record or {}).get("results") or []:
        line += f"\n    -> {r['topic']}/{r['event_type']} {shown_payload(r)}"
    return line


@click.command()
@click.option("-e", "--event", "event", required=True, help="Event JSON, @file, or @-.")
@click.option("--wait", "wait", type=click.FloatRange(0, 600, min_open=True), is_flag=False,
              flag_value=60.0, default=None,
              help="Wait for the runs it causes (seconds, default 60).")
@click.pass_context
def publish(ctx: click.Context, event: str, wait: float | None) -> None:
    """Publish an event to the bus (plugins whose triggers match will run). With --wait,
    exits 0 when every run succeeded (a duplicate runs nothing), 1 when one failed or the
    event was dead-lettered, 5 when they had not finished in time, 6 when no plugin's
    trigger matched it (then the nearest triggers, and any draft or invalid plugin that
    would have matched, are named)."""
    api: Api = ctx.obj["api"]
    body = read_event(event)
    _, data = api.call("POST", "/events", body)
    head = f"published {data['event_id']} as stream entry {data['entry_id']}"
    if not wait:
        ctx.obj["out"](data, head)
        return
    deadline = time.monotonic() + wait
    outcome = wait_handled(api, data["entry_id"], deadline)
    if outcome is None:
        ctx.obj["out"]({**data, "handled": False}, f"{head}\nnot handled by the listener in "
                       f"{wait:g}s (is it running? make status)")
        click.echo(f"the wait ran out after {wait:g}s: the listener has not read stream entry "
                   f"{data['entry_id']} yet (is it running? make status)", err=True)
        sys.exit(EXIT_WAIT)
    if outcome["dead"]:
        ctx.obj["out"]({**data, **outcome}, f"{head}\ndead-lettered: {outcome['dead']}")
        sys.exit(EXIT_FAILED)
    if not outcome["runs"]:
        sent = json.loads(body)
        _, listed = api.call("GET", "/plugins")
        why = why_nothing(str(sent.get("topic")), str(sent.get("event_type")),
                          listed["plugins"])
        ctx.obj["out"]({**data, **outcome, "why": why},
                       "\n".join([head, "  no plugin's trigger matches it", *(
                           f"  {line}" for line in why)]))
        sys.exit(EXIT_NO_MATCH)
    records = {}
    for run in outcome["runs"]:
        if not run["duplicate"]:
            ref = {"record": f"/invocations/{run['invocation_id']}"}
            progress = Progress.for_terminal(api, run["invocation_id"], ctx.obj["json"])
            status, record = poll_record(api, ref, deadline, progress)
            if progress is not None:
                progress.clear()
            records[run["invocation_id"]] = record if status == 200 else None
    lines = [run_line(r, records.get(r["invocation_id"]), data["event_id"])
             for r in outcome["runs"]]
    ctx.obj["out"]({**data, **outcome, "records": records}, "\n".join([head, *lines]))
    unfinished = [r["invocation_id"] for r in outcome["runs"] if not r["duplicate"]
                  and records.get(r["invocation_id"]) is None]
    for invocation_id in unfinished:
        ran_out(api, invocation_id, wait)
    if any(r is None for r in records.values()):
        sys.exit(EXIT_WAIT)
    if any(r["status"] != "succeeded" for r in records.values() if r):
        sys.exit(EXIT_FAILED)
