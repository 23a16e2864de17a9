"""What the console's pages show, read from Redis and the registry (no Flask here: the
pages render these, the tests read them).

Everything a plugin provides (names, output, payloads, reasons quoting it) is returned as
data; the templates escape it (Jinja's autoescape) and the page's script sets it only as
text, never as markup.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from manager.api.bus_routes import newest_dead
from manager.api.context import ApiContext
from manager.core.beats import WorkerBeat
from manager.core.lines import lines
from manager.core.records import InvocationRecord, Status
from manager.core.stats import minute_counts

RECENT = 100  # runs of a plugin its row's figures are computed over
SCAN = 2_000  # newest runs looked through for a status filter


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Figures:
    """A plugin's recent runs in numbers."""

    last_status: str | None
    p50_s: float | None
    p99_s: float | None
    warm_share: float | None
    durations: tuple[float, ...]

    @classmethod
    def of(cls, runs: list[dict[str, Any]]) -> Figures:
        """From run rows, newest first."""
        durations = [r["duration_s"] for r in runs if r["duration_s"] is not None]
        ran = [r for r in runs if r["warm"] is not None]
        return cls(runs[0]["status"] if runs else None, quantile(durations, 0.5),
                   quantile(durations, 0.99),
                   sum(1 for r in ran if r["warm"]) / len(ran) if ran else None,
                   tuple(durations))


def overview(c: ApiContext, now: float | None = None) -> dict[str, Any]:
    """The overview page: the last hour per minute, every plugin's line, the workers."""
    now = time.time() if now is None else now
    minutes = minute_counts(c.conn, c.keys, now, 60)
    entries = c.registry.entries()
    queues = lines(c.conn, c.keys, entries, now)
    hour_ago_ms = int((now - 3600) * 1000)
    dead = len(c.conn.xrange(c.settings.dead_stream, min=f"{hour_ago_ms}-0", count=10_000))
    warm = sum(m["warm"] for m in minutes)
    ran = warm + sum(m["cold"] for m in minutes)
    return {
        "minutes": minutes,
        "queues": [{"plugin": name, **line.public()} for name, line in queues.items()
                   if line.depth],
        "workers": len(WorkerBeat.all(c.conn, c.keys)),
        "warm_share": warm / ran if ran else None,
        "dead_last_hour": dead,
        "ended_last_hour": sum(m["ended"] for m in minutes),
        "failed_last_hour": sum(m["failed"] for m in minutes),
    }


def plugin_rows(c: ApiContext, now: float | None = None) -> list[dict[str, Any]]:
    """The plugins page: each plugin's entry, line and recent figures."""
    now = time.time() if now is None else now
    entries = c.registry.entries()
    queues = lines(c.conn, c.keys, entries, now)
    recent = runs_of_plugins(c, list(entries), RECENT, FIGURE_FIELDS)
    return [{**entry.public(), "queue": queues[name].public(),
             "figures": Figures.of(recent[name])} for name, entry in entries.items()]


def runs_of_plugins(c: ApiContext, names: list[str], limit: int,
                    fields: tuple[str, ...] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each plugin's newest run rows (or only these fields of them), in two round trips
    whatever the number of plugins."""
    pipe = c.conn.pipeline(transaction=False)
    for name in names:
        pipe.zrevrange(c.keys.plugin_invocations(name), 0, limit - 1)
    ids = pipe.execute()
    found = iter(rows_of(c, [i for some in ids for i in some], fields))
    return {name: [r for r in (next(found) for _ in some) if r]
            for name, some in zip(names, ids, strict=True)}


FIGURE_FIELDS = ("status", "duration_s", "warm")
ROW_FIELDS = ("invocation_id", "plugin", "version", "status", "topic", "event_type",
              "created_at", "duration_s", "warm", "worker")


def rows_of(c: ApiContext, ids: list[bytes],
            fields: tuple[str, ...] | None = None) -> list[dict[str, Any] | None]:
    """The list's fields of these runs (not their output or event: a list of thousands
    reads what it shows), in one round trip, one per id; an expired run is None."""
    fields = fields or ROW_FIELDS
    pipe = c.conn.pipeline(transaction=False)
    for i in ids:
        pipe.hmget(c.keys.invocation(i.decode()), *fields)
    rows: list[dict[str, Any] | None] = []
    for values in pipe.execute():
        if values[0] is None:
            rows.append(None)
            continue
        row = {f: None if v is None else json.loads(v)
               for f, v in zip(fields, values, strict=True)}
        rows.append({"id": row.pop("invocation_id", None), **row})
    return rows


def plugin_page(c: ApiContext, name: str) -> dict[str, Any]:
    """A plugin: its entry, kept versions, recent runs and their latency histogram."""
    entry = c.registry.get(name)
    runs = runs_of_plugins(c, [name], RECENT)[name]
    figures = Figures.of(runs)
    return {"entry": entry.public() if entry else None,
            "versions": [{**e.ref(), "loaded_at": e.loaded_at,
                          "serving": entry is not None and e.digest == entry.digest}
                         for e in c.registry.versions(name)],
            "runs": runs[:25], "figures": figures,
            "histogram": histogram(figures.durations)}


def histogram(durations: tuple[float, ...], bins: int = 12) -> list[dict[str, Any]]:
    """Durations in `bins` equal bins from the fastest to the slowest."""
    if not durations:
        return []
    low, high = min(durations), max(durations)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for d in durations:
        counts[min(bins - 1, int((d - low) / width))] += 1
    top = max(counts)
    return [{"from_s": low + i * width, "to_s": low + (i + 1) * width, "count": n,
             "height": n / top} for i, n in enumerate(counts)]


def recent_runs(c: ApiContext, plugin: str = "", status: str = "",
                limit: int = 50) -> list[dict[str, Any]]:
    """The newest runs' rows, of one plugin or of all, of one status or of any (a status
    is looked for among the newest SCAN runs)."""
    index = c.keys.plugin_invocations(plugin) if plugin else c.keys.invocations
    ids = c.conn.zrevrange(index, 0, (SCAN if status else limit) - 1)
    if not status:
        return [r for r in rows_of(c, ids) if r]
    pipe = c.conn.pipeline(transaction=False)
    for i in ids:
        pipe.hget(c.keys.invocation(i.decode()), "status")
    wanted = json.dumps(status).encode()
    return [r for r in rows_of(c, [i for i, found in zip(ids, pipe.execute(), strict=True)
                                   if found == wanted][:limit]) if r]


def timeline(record: InvocationRecord) -> list[dict[str, Any]]:
    """queued -> started (claimed by a worker) -> ended, each with its time and what is
    known of it; a run sent again says how often and why in its page's heading."""
    steps = [{"step": "queued", "at": record.created_at, "detail": f"origin {record.origin}"}]
    if record.started_at:
        place = {True: "warm", False: "cold", None: "no container"}[record.warm]
        isolation = (record.request or {}).get("isolation") or ""
        ready = (f"its container ready in {record.container_start_s:.3f} s"
                 if record.container_start_s is not None else "")
        steps.append({"step": "started", "at": record.started_at,
                      "detail": " · ".join(p for p in (record.worker or "", place, isolation,
                                                        ready) if p)})
    if record.finished_at and record.status.terminal:
        steps.append({"step": record.status.value, "at": record.finished_at,
                      "detail": record.reason or ""})
    return steps


def dead_letters(c: ApiContext, limit: int = 50) -> list[dict[str, Any]]:
    """The newest dead letters, each event shown as indented JSON (or as it arrived)."""
    letters = newest_dead(c, limit)
    for letter in letters:
        letter["shown"] = json.dumps(letter["event"], indent=2, ensure_ascii=False) \
            if not isinstance(letter["event"], str) else letter["event"]
    return letters


def workers(c: ApiContext) -> list[WorkerBeat]:
    return WorkerBeat.all(c.conn, c.keys)


STATUSES = [s.value for s in Status]
