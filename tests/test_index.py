"""The trigger index answers exactly what the plain rule does (manager.bus.matching): a
property test on random topics, types and globs (character classes, `?`, a lone `*`,
exact names), timers by their own ticks, and invalid plugins never matched."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from manager.bus.index import TriggerIndex, literal_prefix
from manager.bus.matching import match
from manager.core.events import Event
from manager.plugins.loader import PluginEntry, PluginStatus
from manager.plugins.manifest import Manifest

NAMES = st.text(alphabet="ab.1", min_size=1, max_size=5)
PARTS = st.sampled_from(["a", "b", ".", "1", "*", "?", "[ab]", "[!a]", "[.-b]"])
GLOBS = st.one_of(NAMES, st.lists(PARTS, min_size=1, max_size=5).map("".join))


def entry(name: str, triggers: list[dict], status: PluginStatus = PluginStatus.LOADED
          ) -> PluginEntry:
    manifest = Manifest.model_validate_json(json.dumps({
        "name": name, "version": "1.0.0", "entrypoint": "python main.py", "image": "x",
        "triggers": triggers}))
    return PluginEntry(name, status, "/p", "1.0.0", "sha256:x", (), manifest)


@st.composite
def registries(draw: st.DrawFn) -> list[PluginEntry]:
    plugins = []
    for n in range(draw(st.integers(1, 8))):
        triggers = [{"topic": draw(GLOBS), "event_type": draw(GLOBS)}
                    for _ in range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):
            triggers.append({"every": draw(st.sampled_from(["30s", "5m"]))})
        status = draw(st.sampled_from([PluginStatus.LOADED, PluginStatus.LOADED,
                                       PluginStatus.DRAFT]))
        try:
            plugins.append(entry(f"p{n}", triggers, status))
        except ValidationError:
            assume(False)  # a glob the manifest refuses (an unclosed class) is never loaded
    return plugins


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.filter_too_much])
@given(registries(), NAMES, NAMES, st.data())
def test_the_index_answers_what_the_plain_rule_does(plugins: list[PluginEntry], topic: str,
                                                    event_type: str, data: st.DataObject
                                                    ) -> None:
    index = TriggerIndex.of(plugins)
    event = Event("e1", topic, event_type)
    assert [p.name for p in index.match(event)] == [p.name for p in match(event, plugins)]
    # a tick of one plugin's timer runs that plugin (and any glob that takes ticks)
    timed = [(p, s) for p in plugins for s in (p.manifest.schedules if p.manifest else ())]
    if timed:
        plugin, schedule = data.draw(st.sampled_from(timed))
        tick = Event("t1", "timer.v1", "tick", {"plugin": plugin.name, "timer": schedule.key})
        assert [p.name for p in index.match(tick)] == [p.name for p in match(tick, plugins)]


def test_exact_globs_and_known_topics() -> None:
    plugins = [entry("exact", [{"topic": "fs.v1", "event_type": "file_created"}]),
               entry("glob", [{"topic": "fs.*", "event_type": "*"}]),
               entry("all", [{"topic": "*", "event_type": "*"}]),
               entry("draft", [{"topic": "fs.v1", "event_type": "*"}], PluginStatus.DRAFT)]
    index = TriggerIndex.of(plugins)
    names = [p.name for p in index.match(Event("e", "fs.v1", "file_created"))]
    assert names == ["all", "exact", "glob"]
    assert [p.name for p in index.match(Event("e", "FS.v1", "x"))] == ["all"]
    assert index.topics == {"fs.v1"}
    assert set(index.globs) == {"fs.", ""}  # a glob is tried only on topics it can match


def test_literal_prefix() -> None:
    assert literal_prefix("fs.v1") == "fs.v1"
    assert literal_prefix("fs.*") == "fs."
    assert literal_prefix("[ab].v1") == "" and literal_prefix("a?") == "a"
