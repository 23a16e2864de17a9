"""Prometheus metrics (SPEC §6): their definitions, moved only by the observer
(manager.core.observer), and what /metrics serves. Worker processes write to
PROMETHEUS_MULTIPROC_DIR when it is set, and the manager's /metrics endpoint on port 8004
aggregates all of them."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

EVENTS_RECEIVED = Counter("titan_events_received_total", "Valid events read from the bus",
                          ["topic"])
EVENTS_REJECTED = Counter("titan_events_rejected_total", "Events dead-lettered", ["reason"])
DEAD_LETTERS = Counter("titan_events_dead_total", "Entries written to the dead-letter stream",
                       ["reason"])
DUPLICATES = Counter("titan_events_duplicate_total", "Events not run again for a plugin "
                     "because their event_id already ran it", ["plugin"])
TASKS_DISPATCHED = Counter("titan_tasks_dispatched_total", "Plugin runs enqueued", ["plugin"])
INVOCATIONS = Counter("titan_invocations_total", "Finished plugin runs", ["plugin", "status"])
REQUEUED = Counter("titan_runs_requeued_total", "Abandoned runs the sweeper sent again",
                   ["plugin"])
THROTTLED = Counter("titan_throttle_waits_total", "Times a run waited for a worker slot: its "
                    "manifest's concurrency cap, or its plugin's fair share",
                    ["plugin", "reason"])
QUEUE_WAIT = Histogram("titan_queue_wait_seconds", "From a run's record to its first start "
                       "(queued and throttled time)", ["plugin"],
                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
POOL_HITS = Counter("titan_prewarm_hits_total", "Runs that found a prewarmed container",
                    ["plugin"])
POOL_EVICTIONS = Counter("titan_prewarm_evictions_total", "Idle prewarmed containers removed "
                         "to give their slot to a configuration used more recently",
                         ["plugin"])
POOL_MISSES = Counter("titan_prewarm_misses_total", "Runs that started a cold container",
                      ["plugin"])
PREWARMED_IDLE = Gauge("titan_prewarmed_idle", "Prewarmed containers waiting for a run",
                       multiprocess_mode="livesum")
CONTAINER_READY = Histogram("titan_container_ready_seconds",
                            "From the start of a run to its container being ready",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
RELOADS = Counter("titan_reloads_total", "Registry reloads: ok, partial (a plugin was "
                  "rejected) or failed", ["result"])
TIMER_TICKS = Counter("titan_timer_ticks_total", "Timer ticks: fired on time, late (a "
                      "catch-up after a tick was missed) or skipped", ["plugin", "outcome"])
TIMER_LATENESS = Histogram("titan_timer_lateness_seconds", "From a tick's scheduled time to "
                           "its event on the bus", ["plugin"],
                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 30, 300, 3600))
EGRESS_REQUESTS = Counter("titan_egress_requests_total", "Requests runs sent the egress "
                          "proxy, by what it decided", ["plugin", "decision"])
EGRESS_BYTES = Counter("titan_egress_bytes_total", "Bytes runs moved through the egress "
                       "proxy (sent and received)", ["plugin", "direction"])
RETRIES = Counter("titan_retries_total", "Runs sent again, by why", ["plugin", "reason"])


RUN_LABELS = ["plugin", "warm", "isolation"]  # warm: true/false; isolation: container/gvisor
DURATION = Histogram("titan_invocation_duration_seconds", "Plugin run wall time", RUN_LABELS,
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                              300, 600))
EVENT_TO_RESULT = Histogram(
    "titan_event_to_result_seconds", "From the event matched (its run recorded) to the run's "
    "outcome stored and its result events published", RUN_LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
CONTAINER_START = Histogram("titan_container_start_seconds", "Container create+start time",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class StateCollector(Collector):
    """Gauges computed at scrape time from Redis: plugins by status, queue depths."""

    def __init__(self, plugin_counts: Callable[[], dict[str, int]],
                 queue_depths: Callable[[], dict[str, int]],
                 plugin_lines: Callable[[], dict[str, Any]] = dict) -> None:
        self.plugin_counts = plugin_counts
        self.queue_depths = queue_depths
        self.plugin_lines = plugin_lines

    def collect(self) -> Iterator[Any]:
        plugins = GaugeMetricFamily("titan_plugins", "Plugins in the registry", labels=["status"])
        queues = GaugeMetricFamily("titan_queue_depth", "Entries waiting", labels=["queue"])
        depth = GaugeMetricFamily("titan_plugin_queue_depth", "A plugin's runs sent and "
                                  "not yet running", labels=["plugin"])
        oldest = GaugeMetricFamily("titan_plugin_oldest_wait_seconds", "How long a "
                                   "plugin's oldest run in line has waited", labels=["plugin"])
        try:
            for status, n in self.plugin_counts().items():
                plugins.add_metric([status], n)
            for queue, n in self.queue_depths().items():
                queues.add_metric([queue], n)
            for plugin, line in self.plugin_lines().items():
                depth.add_metric([plugin], line.depth)
                oldest.add_metric([plugin], line.oldest_wait_s or 0.0)
        except Exception:  # a scrape during a Redis outage still serves the counters
            pass
        yield from (plugins, queues, depth, oldest)


class TreeCollector(Collector):
    """Merges the multiprocess files of this host's processes and of worker containers,
    which write into subdirectories (one per container: their pids repeat)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(self.root, "**", "*.db"), recursive=True)
        return iter(MultiProcessCollector.merge(files, accumulate=True))


def registry_for(state: StateCollector) -> CollectorRegistry:
    """What /metrics shows: every process's metrics (the multiprocess directory, when
    set) and the manager's state."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry.register(TreeCollector(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(state)
    return registry
