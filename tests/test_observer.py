"""The observer decides which metric each happening moves (pure: the process's own
Prometheus registry). What the metrics say after real runs: tests/test_run_metrics.py."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY

from manager.core.observer import observer
from manager.core.runs import RetryReason


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_requeue_is_a_retry_for_an_abandoned_run() -> None:
    plugin = f"p{uuid.uuid4().hex[:6]}"
    observer().requeued(plugin)
    assert value("titan_runs_requeued_total", plugin=plugin) == 1
    assert value("titan_retries_total", plugin=plugin,
                 reason=RetryReason.ABANDONED.value) == 1


def test_a_topic_no_trigger_names_is_counted_as_other() -> None:
    topic = f"t{uuid.uuid4().hex[:6]}.v1"
    before = value("titan_events_received_total", topic="other")
    observer().event_received(topic, known_topics={"chat.v1"})
    observer().event_received("chat.v1", known_topics={"chat.v1"})
    assert value("titan_events_received_total", topic=topic) == 0
    assert value("titan_events_received_total", topic="other") == before + 1


def test_a_skipped_tick_has_no_lateness_and_a_fired_one_has() -> None:
    plugin = f"p{uuid.uuid4().hex[:6]}"
    observer().timer_ticked(plugin, "skipped", count=3)
    observer().timer_ticked(plugin, "fired", late_s=0.2)
    assert value("titan_timer_ticks_total", plugin=plugin, outcome="skipped") == 3
    assert value("titan_timer_lateness_seconds_count", plugin=plugin) == 1


def test_a_reload_is_ok_partial_or_failed() -> None:
    before = {r: value("titan_reloads_total", result=r) for r in ("ok", "partial", "failed")}
    observer().reloaded({"added": [], "rejected": []})
    observer().reloaded({"added": [], "rejected": [{"name": "x"}]})
    observer().reloaded(None)
    assert {r: value("titan_reloads_total", result=r) - n for r, n in before.items()} == \
        {"ok": 1, "partial": 1, "failed": 1}


def test_egress_counts_each_request_and_its_bytes_both_ways() -> None:
    plugin = f"p{uuid.uuid4().hex[:6]}"
    observer().egress(plugin, [{"decision": "allowed", "bytes_sent": 10, "bytes_received": 5},
                               {"decision": "denied", "bytes_sent": 0, "bytes_received": 0}])
    assert value("titan_egress_requests_total", plugin=plugin, decision="allowed") == 1
    assert value("titan_egress_bytes_total", plugin=plugin, direction="received") == 5
