"""Where a warm run's time goes, at its p50 and at its p99: each measured run's end-to-end
time split by its record's timestamps (one host, one clock) into the steps a run takes.

- `before`: the event's XADD to its container's launch (listener, record, broker, claim,
  the payload and the grant);
- `ready`: the launch to the container being ready for it (near 0 when prewarmed; a cold
  fallback's create and start otherwise);
- `run`: the plugin's own run, to its launcher's closing line;
- `after`: the run's end to its result event read (the record, the events, the bench's read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from harness import Bus, new_id, wired

STEPS = ("before", "ready", "run", "after")
# the measured kinds of prewarmed run and the plugin each runs
WARM_KINDS = {"warm": "noop", "gvisor_warm": "noop_gvisor", "files_warm": "file_watcher",
              "egress_warm": "noop_net"}


@dataclass(frozen=True)
class Timed:
    event_id: str
    published: float  # wall clock, when the event was XADDed
    took: float  # seconds, to its result event read


@dataclass
class Ledger:
    """Every measured end-to-end run, by kind, with what finds its record again."""

    runs: dict[str, list[Timed]] = field(default_factory=dict)

    def e2e(self, bus: Bus, kind: str, event_type: str, payload: dict | None = None,
            topic: str = "bench.v1", expect: str = "tock") -> float:
        """One event to its result, recorded under `kind`; its seconds."""
        event_id = new_id("bench")
        event = {"event_id": event_id, "topic": topic, "event_type": event_type}
        if payload:
            event["payload"] = payload
        published, t0 = time.time(), time.perf_counter()
        entry = bus.publish(event)
        # read on from the event's own entry: the bench parsing the whole stream each time
        # would compete for the CPU with the listener it measures
        result = bus.result_of(event_id, timeout=120, after=entry)
        took = time.perf_counter() - t0
        assert result["event_type"] == expect, result
        self.runs.setdefault(kind, []).append(Timed(event_id, published, took))
        return took

    def forget(self) -> None:
        """Drops what was recorded so far (the warm-up's runs)."""
        self.runs.clear()


def at(runs: list[Timed], q: float) -> Timed:
    ordered = sorted(runs, key=lambda t: t.took)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def split(bus: Bus, ledger: Ledger) -> dict[str, dict[str, dict[str, float | bool]]]:
    """kind -> "p50"/"p99" -> each step's milliseconds and whether that run was warm."""
    records = wired(bus.conn, bus.settings).records
    found: dict[str, dict[str, dict[str, float | bool]]] = {}
    for kind, plugin in WARM_KINDS.items():
        runs = ledger.runs.get(kind) or []
        if not runs:
            continue
        by_event = {r.event_id: r for r in records.for_plugin(plugin, 4 * len(runs))}
        cold = [t for t in runs if (r := by_event.get(t.event_id)) and r.warm is False]
        found[kind] = {"cold": {"runs": len(runs), "cold": len(cold)}}
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            timed = at(runs, q)
            rec = by_event.get(timed.event_id)
            if rec is None or rec.started_at is None or rec.finished_at is None:
                continue
            ready = rec.container_start_s or 0.0
            found[kind][label] = {
                "before": (rec.started_at - timed.published) * 1000, "ready": ready * 1000,
                "run": ((rec.duration_s or 0.0) - ready) * 1000,
                "after": (timed.published + timed.took - rec.finished_at) * 1000,
                "total": timed.took * 1000, "warm": bool(rec.warm)}
    return found


def phases_report(found: dict[str, dict[str, dict[str, float | bool]]]) -> list[str]:
    lines = []
    for kind, by_q in found.items():
        counts = by_q.pop("cold")
        lines.append(f"where    {kind:<12} {counts['cold']} of its {counts['runs']} measured "
                     "runs found no prewarmed container")
        for label, p in by_q.items():
            steps = "  ".join(f"{s} {p[s]:6.1f}" for s in STEPS)
            lines.append(f"where    {kind:<12} {label} {p['total']:7.1f} ms: {steps} ms "
                         f"({'prewarmed' if p['warm'] else 'COLD fallback'})")
    return lines
