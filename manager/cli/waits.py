"""What a wait says when it runs out, and the time a run spent in the queue: a user who
waited and got no result is told how long, where the run stands, and how to follow it."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from manager.cli.client import Api
from manager.core.records import TERMINAL


def command_name() -> str:
    """How the operator ran this CLI, for the commands it suggests (`python3
    titan-plugins.py` and the virtualenv's `titan-plugins` are the same CLI)."""
    given = sys.argv[0] or "titan-plugins"
    return f"python3 {given}" if given.endswith(".py") else os.path.basename(given)


def queued_s(rec: dict[str, Any]) -> float | None:
    """From the run's record to the start of the attempt that ran (None: not started)."""
    if rec.get("started_at") and rec.get("created_at"):
        return round(max(0.0, rec["started_at"] - rec["created_at"]), 3)
    return None


def ran_out(api: Api, invocation_id: str, waited: float) -> str:
    """Says on stderr that the wait ran out: the run's status, how long it has waited,
    how many runs are ahead of it, and the commands that follow it. Returns that status
    (what stdout says too)."""
    _, at = api.call("GET", f"/invocations/{invocation_id}/standing")
    me, plugin = command_name(), at["plugin"]
    if at["status"] not in TERMINAL and at["status"] != "running":  # not started yet
        where = (f"{at['status']} for {at['queued_s']}s, behind {at['ahead']} unstarted "
                 f"run(s), with {at['running']} running")
    else:
        where = f"{at['status']} (it waited {at['queued_s']}s before it started)"
    click.echo(f"the wait ran out after {waited:g}s: run {invocation_id} of {plugin} is "
               f"{where}\n  follow it: {me} show {invocation_id}  |  {me} logs -f {plugin}",
               err=True)
    return str(at["status"])


class Progress:
    """A wait's progress on a terminal, one line on stderr redrawn in place: while the run
    is queued, how long and how many runs are ahead of it; once it runs, on which worker.
    Made only for a terminal and without --json (a pipe or a script reads no progress)."""

    def __init__(self, api: Api, invocation_id: str) -> None:
        self.api, self.invocation_id, self.drawn = api, invocation_id, False

    @classmethod
    def for_terminal(cls, api: Api, invocation_id: str, as_json: bool) -> Progress | None:
        return None if as_json or not sys.stderr.isatty() else cls(api, invocation_id)

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("status") == "running":
            line = f"running on {record.get('worker') or 'a worker'}"
        else:
            _, at = self.api.call("GET", f"/invocations/{self.invocation_id}/standing")
            line = (f"{at['status']} {at['queued_s']:.1f}s, {at['ahead']} run(s) ahead, "
                    f"{at['running']} running")
        click.echo(f"\r\033[K{record.get('plugin')}: {line}", nl=False, err=True)
        self.drawn = True

    def clear(self) -> None:
        if self.drawn:
            click.echo("\r\033[K", nl=False, err=True)
