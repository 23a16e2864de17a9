"""The console's figures, as pure logic: quantiles, a plugin's recent runs in numbers, the
latency histogram and a reload's summary (pages and sessions: tests/test_console.py)."""

from __future__ import annotations

from manager.api.console.pages import summary_of
from manager.api.console.views import Figures, histogram, quantile


def row(status: str, duration: float | None, warm: bool | None) -> dict:
    return {"status": status, "duration_s": duration, "warm": warm}


def test_figures_read_the_newest_run_first_and_skip_runs_with_no_container() -> None:
    runs = [row("failed", 0.5, False), *[row("succeeded", d / 100, True) for d in range(99)],
            row("rejected", None, None)]
    figures = Figures.of(runs)
    assert figures.last_status == "failed"
    assert figures.p50_s == 0.5 and figures.p99_s == 0.98
    assert figures.warm_share == 99 / 100
    assert Figures.of([]) == Figures(None, None, None, None, ())


def test_quantiles_are_of_the_values_given() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.99) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 3.0


def test_the_histogram_puts_every_run_in_a_bin_and_scales_to_the_tallest() -> None:
    bins = histogram(tuple([0.1] * 5 + [0.2, 1.3]), bins=4)
    assert [b["count"] for b in bins] == [6, 0, 0, 1]
    assert bins[0]["height"] == 1.0 and bins[-1]["to_s"] == 1.3
    assert histogram(()) == []
    assert [b["count"] for b in histogram((0.5, 0.5), bins=3)] == [2, 0, 0]  # all equal


def test_a_reload_summary_names_what_changed_and_why_an_edit_was_rejected() -> None:
    said = summary_of({"added": [{"name": "a"}], "updated": [{"name": "b"}], "removed": [],
                       "rejected": [{"name": "c", "errors": ["version: missing"]}],
                       "drafts": [], "warnings": [{"name": "b"}]})
    assert said == ("reloaded: added a; updated b; rejected c. "
                    "Rejected: c: version: missing")
    assert summary_of({"added": [], "rejected": []}) == "reloaded: nothing changed"
