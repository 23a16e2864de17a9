"""Trigger matching (pure): which plugins an event should run, the plain rule. The
listener answers it through manager.bus.index (the same answer at a cost that does not
grow with the plugins; tests/test_index.py holds the two to each other)."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from manager.core.events import Event
from manager.plugins.loader import PluginEntry
from manager.plugins.manifest import Trigger
from manager.plugins.schedule import TICK, TIMER_TOPIC, Schedule


def trigger_matches(trigger: Trigger, topic: str, event_type: str) -> bool:
    """Exact names or shell-style globs ("fs.*", "*"), case-sensitive."""
    return fnmatchcase(topic, trigger.topic) and fnmatchcase(event_type, trigger.event_type)


def fires(trigger: Trigger | Schedule, event: Event, plugin: str) -> bool:
    """An event trigger matches by topic and type; a timer only by its own ticks (the tick
    names the plugin and the timer's key), so another plugin's clock never runs this one."""
    if isinstance(trigger, Schedule):
        return (event.topic == TIMER_TOPIC and event.event_type == TICK
                and event.payload.get("plugin") == plugin
                and event.payload.get("timer") == trigger.key)
    return trigger_matches(trigger, event.topic, event.event_type)


def match(event: Event, plugins: Iterable[PluginEntry]) -> list[PluginEntry]:
    """Runnable plugins with at least one trigger matching the event, in name order."""
    return sorted(
        (p for p in plugins if p.runnable and p.manifest is not None
         and any(fires(t, event, p.name) for t in p.manifest.triggers)),
        key=lambda p: p.name,
    )
