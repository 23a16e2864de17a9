"""What happens to events and runs, told to one observer: the only module that updates
the Prometheus metrics (manager.core.metrics holds their definitions and the /metrics
exposition). As dramatiq's middleware and arq's `on_job_start`/`on_job_end` keep their
metrics, the listener, the dispatcher, the sweeper, the timers and the worker's steps
each say what happened (a run claimed, throttled, retried, ended) in the run's own words,
and this module decides which metric that moves.

One observer per process (`observer()`): its state is Prometheus's, per process (and
merged across processes through PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import functools
from collections.abc import Container, Iterable
from typing import Any

from manager.core import metrics
from manager.core.runs import RetryReason


class RunObserver:
    # --- events on the bus
    def event_received(self, topic: str, known_topics: Container[str]) -> None:
        """A valid event read. Topics named by loaded triggers keep their name; the rest
        are `other`, so a producer cannot grow the label set without bound."""
        label = topic if topic in known_topics else "other"
        metrics.EVENTS_RECEIVED.labels(topic=label).inc()

    def dead_lettered(self, reason: str) -> None:
        metrics.EVENTS_REJECTED.labels(reason=reason).inc()
        metrics.DEAD_LETTERS.labels(reason=reason).inc()

    def dispatched(self, plugin: str) -> None:
        """A run recorded and sent (by the listener, the API or a timer)."""
        metrics.TASKS_DISPATCHED.labels(plugin=plugin).inc()

    def duplicate(self, plugin: str) -> None:
        """An event whose event_id already ran this plugin: not run again."""
        metrics.DUPLICATES.labels(plugin=plugin).inc()

    # --- a run's life
    def claimed(self, plugin: str, queued_s: float) -> None:
        """A run's first attempt started, `queued_s` after its record."""
        metrics.QUEUE_WAIT.labels(plugin=plugin).observe(max(0.0, queued_s))

    def throttled(self, plugin: str, reason: str) -> None:
        metrics.THROTTLED.labels(plugin=plugin, reason=reason).inc()

    def retried(self, plugin: str, reason: RetryReason) -> None:
        metrics.RETRIES.labels(plugin=plugin, reason=reason).inc()

    def requeued(self, plugin: str) -> None:
        """The sweeper sent an abandoned run again."""
        metrics.REQUEUED.labels(plugin=plugin).inc()
        self.retried(plugin, RetryReason.ABANDONED)

    def container_ready(self, seconds: float) -> None:
        """From a run's start to its container being ready (warm or cold)."""
        metrics.CONTAINER_READY.observe(seconds)

    def ran(self, plugin: str, warm: bool, isolation: str, ready_s: float,
            duration_s: float) -> None:
        """A container ran the plugin to its end."""
        metrics.CONTAINER_START.observe(ready_s)
        metrics.DURATION.labels(**run_labels(plugin, warm, isolation)).observe(duration_s)

    def ended(self, plugin: str, status: str) -> None:
        """A run's end stored (once per run, whatever ended it)."""
        metrics.INVOCATIONS.labels(plugin=plugin, status=status).inc()

    def answered(self, plugin: str, warm: bool, isolation: str, since_event_s: float) -> None:
        """A run's outcome stored and its results published, `since_event_s` after its
        event was matched."""
        metrics.EVENT_TO_RESULT.labels(**run_labels(plugin, warm, isolation)).observe(
            max(0.0, since_event_s))

    def egress(self, plugin: str, connections: Iterable[dict[str, Any]]) -> None:
        """The requests a run sent through the egress proxy."""
        for c in connections:
            metrics.EGRESS_REQUESTS.labels(plugin=plugin, decision=c["decision"]).inc()
            metrics.EGRESS_BYTES.labels(plugin=plugin, direction="sent").inc(c["bytes_sent"])
            metrics.EGRESS_BYTES.labels(plugin=plugin, direction="received").inc(
                c["bytes_received"])

    # --- prewarmed containers
    def prewarm_taken(self, plugin: str, warm: bool) -> None:
        """A run found a prewarmed container (warm) or starts a cold one."""
        (metrics.POOL_HITS if warm else metrics.POOL_MISSES).labels(plugin=plugin).inc()

    def prewarm_idle(self, count: int) -> None:
        metrics.PREWARMED_IDLE.set(count)

    def prewarm_evicted(self, plugin: str) -> None:
        metrics.POOL_EVICTIONS.labels(plugin=plugin).inc()

    # --- timers and the registry
    def timer_ticked(self, plugin: str, outcome: str, count: int = 1,
                     late_s: float | None = None) -> None:
        metrics.TIMER_TICKS.labels(plugin=plugin, outcome=outcome).inc(count)
        if late_s is not None:
            metrics.TIMER_LATENESS.labels(plugin=plugin).observe(max(0.0, late_s))

    def reloaded(self, changes: dict[str, list[Any]] | None) -> None:
        """ok, partial (some plugin rejected) or failed (changes is None)."""
        result = "failed" if changes is None else "partial" if changes["rejected"] else "ok"
        metrics.RELOADS.labels(result=result).inc()


def run_labels(plugin: str, warm: bool, isolation: str) -> dict[str, str]:
    return {"plugin": plugin, "warm": str(warm).lower(), "isolation": isolation}


@functools.cache
def observer() -> RunObserver:
    """This process's observer."""
    return RunObserver()
