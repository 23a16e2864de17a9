"""Why a published event ran nothing (pure): a plugin that would have matched but is not
in service (a draft, an invalid one), and the triggers nearest to the event's topic and
type, so that `dcos.v1` beside a plugin on `docs.v1` is named, not left to guess."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

NEAREST = 3
MAX_DISTANCE = 3  # edits: a typo, not another name


def distance(a: str, b: str) -> int:
    """Levenshtein's edit distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def event_triggers(plugin: dict[str, Any]) -> list[dict[str, str]]:
    return [t for t in plugin.get("triggers") or [] if "topic" in t]


def out_of_service(topic: str, event_type: str, plugins: list[dict[str, Any]]) -> list[str]:
    """Plugins whose trigger matches the event but which no event runs, and why."""
    said = []
    for p in sorted(plugins, key=lambda p: p["name"]):
        hit = next((t for t in event_triggers(p) if fnmatchcase(topic, t["topic"])
                    and fnmatchcase(event_type, t["event_type"])), None)
        if hit is None or p["status"] == "loaded":
            continue
        where = f"{p['name']} (trigger {hit['topic']}/{hit['event_type']})"
        if p["status"] == "draft":
            said.append(f"{where} matches but is a draft: delete `draft: true` from its "
                        "plugin.yaml, then reload")
        else:
            said.append(f"{where} matches but is {p['status']}: "
                        + ("; ".join(p.get("errors") or []) or "see `validate`"))
    return said


def nearest(topic: str, event_type: str, plugins: list[dict[str, Any]]) -> list[str]:
    """The event triggers closest to topic/event_type, within a few edits."""
    wanted = f"{topic}/{event_type}"
    scored = sorted((distance(wanted, f"{t['topic']}/{t['event_type']}"), p["name"],
                     f"{t['topic']}/{t['event_type']}")
                    for p in plugins for t in event_triggers(p))
    return [f"nearest trigger: {trigger} of {name} ({d} edit{'s' if d > 1 else ''} away)"
            for d, name, trigger in scored[:NEAREST] if 0 < d <= MAX_DISTANCE]


def why_nothing(topic: str, event_type: str, plugins: list[dict[str, Any]]) -> list[str]:
    """What to tell the author of an event that ran no plugin."""
    return (out_of_service(topic, event_type, plugins) + nearest(topic, event_type, plugins)
            or [f"no plugin has a trigger near {topic}/{event_type} (`list` shows them all)"])
