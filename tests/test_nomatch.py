"""Why a published event ran nothing (pure logic): a typo in its topic is named with the
trigger it missed, a draft or invalid plugin that would have matched says why it did
not run, and an event near nothing says so."""

from __future__ import annotations

from manager.cli.nomatch import distance, why_nothing

PLUGINS = [
    {"name": "nc_md", "status": "loaded", "triggers": [
        {"topic": "docs.v1", "event_type": "file_created"},
        {"schedule": "0 * * * *", "timezone": "UTC", "next": []}]},
    {"name": "summary", "status": "draft", "triggers": [
        {"topic": "dcos.v1", "event_type": "file_*"}]},
    {"name": "broken", "status": "invalid", "errors": ["timeout: must be at most 600"],
     "triggers": [{"topic": "*", "event_type": "file_created"}]},
]


def test_edit_distance() -> None:
    assert distance("dcos.v1", "docs.v1") == 2
    assert distance("", "abc") == 3 and distance("same", "same") == 0


def test_a_typo_names_the_trigger_it_missed() -> None:
    said = why_nothing("docs.v2", "file_created", PLUGINS[:1])
    assert said == ["nearest trigger: docs.v1/file_created of nc_md (1 edit away)"]


def test_a_draft_or_invalid_plugin_that_would_match_says_why_it_did_not_run() -> None:
    said = why_nothing("dcos.v1", "file_created", PLUGINS)
    assert said[0] == ("broken (trigger */file_created) matches but is invalid: timeout: "
                       "must be at most 600")
    assert said[1].startswith("summary (trigger dcos.v1/file_*) matches but is a draft: "
                              "delete `draft: true`")
    assert "nearest trigger: docs.v1/file_created of nc_md (2 edits away)" in said


def test_an_event_near_nothing_says_so() -> None:
    assert why_nothing("billing.v3", "invoice_paid", PLUGINS[:1]) == [
        "no plugin has a trigger near billing.v3/invoice_paid (`list` shows them all)"]
