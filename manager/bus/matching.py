"""Trigger matching (pure): which plugins an event should run."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from manager.core.events import Event
from manager.plugins.loader import PluginEntry
from manager.plugins.manifest import Trigger


def trigger_matches(trigger: Trigger, topic: str, event_type: str) -> bool:
    """Exact names or shell-style globs ("fs.*", "*"), case-sensitive."""
    return fnmatchcase(topic, trigger.topic) and fnmatchcase(event_type, trigger.event_type)


def known_topics(plugins: Iterable[PluginEntry]) -> set[str]:
    """The exact (not glob) topics that runnable plugins trigger on."""
    return {t.topic for p in plugins if p.runnable and p.manifest is not None
            for t in p.manifest.triggers if not any(c in t.topic for c in "*?[")}


def match(event: Event, plugins: Iterable[PluginEntry]) -> list[PluginEntry]:
    """Runnable plugins with at least one trigger matching the event, in name order."""
    return sorted(
        (p for p in plugins if p.runnable and p.manifest is not None
         and any(trigger_matches(t, event.topic, event.event_type) for t in p.manifest.triggers)),
        key=lambda p: p.name,
    )
