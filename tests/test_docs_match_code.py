"""docs/configuration.md against the code: every setting and every metric has its line,
and every line names a setting or a metric that exists (a renamed one is not left
behind in the docs)."""

from __future__ import annotations

import dataclasses
import re

from manager.core.client_config import ClientSettings
from manager.core.config import ROOT, Settings

DOC = ROOT / "docs" / "configuration.md"
# Read outside Settings and the CLI client's ClientSettings: by Settings' own source of
# secret files, or by the scripts only.
READERS = ("manager/core/config.py", "scripts/stack.sh",
           "scripts/services.sh", "scripts/common.sh", "scripts/compose.sh", "Makefile",
           "compose.yaml")
METRIC = re.compile(r"(?:Counter|Gauge|Histogram|GaugeMetricFamily)\(\s*\"(titan_[a-z_]+)\"")


def documented() -> str:
    return DOC.read_text()


def test_every_setting_is_documented() -> None:
    missing = [f"TITAN_{name.upper()}" for name in Settings.model_fields
               if not re.search(rf"`TITAN_{name.upper()}`", documented())]
    assert missing == [], f"settings without a line in {DOC.name}: {missing}"


def test_every_variable_documented_is_read() -> None:
    fields = {f"TITAN_{name.upper()}" for name in
              [*Settings.model_fields, *(f.name for f in dataclasses.fields(ClientSettings))]}
    elsewhere = "\n".join((ROOT / path).read_text() for path in READERS)
    named = set(re.findall(r"`(TITAN_[A-Z0-9_]+)`", documented()))
    stale = sorted(v for v in named - fields if v not in elsewhere)
    assert stale == [], f"{DOC.name} names variables nothing reads: {stale}"


def test_every_metric_is_documented_and_every_metric_documented_exists() -> None:
    code = set(METRIC.findall((ROOT / "manager/core/metrics.py").read_text()))
    assert len(code) >= 20, code  # the pattern still finds them
    table = documented().split("\n## Metrics\n", 1)[1]
    named = set(re.findall(r"`(titan_[a-z_]+)[{`]", table))
    assert sorted(code - named) == [], f"metrics without a line in {DOC.name}"
    assert sorted(named - code) == [], f"{DOC.name} names metrics the code has not"


def anchors(text: str) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings."""
    return {re.sub(r"[^\w\- ]", "", m.strip().lower()).replace(" ", "-")
            for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_every_link_between_the_docs_resolves() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = {path: path.read_text() for path in docs}
    broken = []
    for path, text in texts.items():
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", prose):
            if link.startswith(("http://", "https://")):
                continue
            file, _, anchor = link.partition("#")
            target = (path.parent / file).resolve() if file else path
            if not target.exists():
                broken.append(f"{path.name}: {link} (no such file)")
            elif anchor and target in texts and anchor not in anchors(texts[target]):
                broken.append(f"{path.name}: {link} (no such heading)")
    assert broken == []
