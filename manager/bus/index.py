"""The trigger index: which plugins an event runs, at a cost that does not grow with the
plugins. Built once per registry version (the listener keeps it beside the entries it was
built from); the rule it answers is manager.bus.matching's, exactly (tests/test_index.py
compares the two on random topics, types and globs).

- Exact triggers (no `*`, `?` or `[` in topic or type) are one dictionary lookup.
- Globs are grouped by the literal part of their topic before the first wildcard: an event
  tries only the groups keyed by a prefix of its own topic, so `billing.*` is never
  tried on a `chat.v1` event. A glob starting with a wildcard (`*`) is tried on every
  event; there are few.
- Timers are found by the plugin and the timer key their tick names.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import translate

from manager.core.events import Event
from manager.plugins.loader import PluginEntry
from manager.plugins.manifest import Trigger
from manager.plugins.schedule import TICK, TIMER_TOPIC, Schedule

WILDCARDS = re.compile(r"[*?\[]")

Glob = tuple[re.Pattern[str], re.Pattern[str], PluginEntry]


def literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard (all of it when it has none)."""
    wildcard = WILDCARDS.search(pattern)
    return pattern if wildcard is None else pattern[:wildcard.start()]


@dataclass(frozen=True)
class TriggerIndex:
    exact: dict[tuple[str, str], tuple[PluginEntry, ...]]
    globs: dict[str, tuple[Glob, ...]]  # by the literal prefix of the topic's glob
    prefix_lengths: tuple[int, ...]  # the lengths of those prefixes, each once
    timers: dict[tuple[str, str], PluginEntry]  # (plugin, timer key)
    topics: frozenset[str]  # exact topics runnable plugins trigger on (metrics' labels)

    @classmethod
    def of(cls, plugins: Iterable[PluginEntry]) -> TriggerIndex:
        exact: defaultdict[tuple[str, str], list[PluginEntry]] = defaultdict(list)
        globs: defaultdict[str, list[Glob]] = defaultdict(list)
        timers: dict[tuple[str, str], PluginEntry] = {}
        topics: set[str] = set()
        for plugin in plugins:
            if not plugin.runnable or plugin.manifest is None:
                continue
            for trigger in plugin.manifest.triggers:
                if isinstance(trigger, Schedule):
                    timers[(plugin.name, trigger.key)] = plugin
                    topics.add(TIMER_TOPIC)
                    continue
                cls._add(trigger, plugin, exact, globs, topics)
        return cls({k: tuple(v) for k, v in exact.items()},
                   {k: tuple(v) for k, v in globs.items()},
                   tuple(sorted({len(k) for k in globs})), timers, frozenset(topics))

    @staticmethod
    def _add(trigger: Trigger, plugin: PluginEntry,
             exact: defaultdict[tuple[str, str], list[PluginEntry]],
             globs: defaultdict[str, list[Glob]], topics: set[str]) -> None:
        topic_is_glob = WILDCARDS.search(trigger.topic) is not None
        if not topic_is_glob:
            topics.add(trigger.topic)
        if not topic_is_glob and WILDCARDS.search(trigger.event_type) is None:
            exact[(trigger.topic, trigger.event_type)].append(plugin)
            return
        # fnmatchcase is re.match of fnmatch.translate: the same patterns, compiled once
        globs[literal_prefix(trigger.topic)].append(
            (re.compile(translate(trigger.topic)), re.compile(translate(trigger.event_type)),
             plugin))

    def match(self, event: Event) -> list[PluginEntry]:
        """Runnable plugins with at least one trigger matching the event, in name order."""
        found = {p.name: p for p in self.exact.get((event.topic, event.event_type), ())}
        topic = event.topic
        for end in self.prefix_lengths:
            if end > len(topic):
                break
            for topic_re, type_re, plugin in self.globs.get(topic[:end], ()):
                if plugin.name not in found and topic_re.match(topic) \
                        and type_re.match(event.event_type):
                    found[plugin.name] = plugin
        if topic == TIMER_TOPIC and event.event_type == TICK:
            name, key = event.payload.get("plugin"), event.payload.get("timer")
            plugin = self.timers.get((name, key)) if isinstance(name, str) \
                and isinstance(key, str) else None
            if plugin is not None:
                found.setdefault(plugin.name, plugin)
        return [found[name] for name in sorted(found)]
