"""Reload never serves a half-written plugin: a writer rewrites main.py (and data.txt) in
chunks while reloads run without pause and events keep arriving; no run fails with a
SyntaxError, none runs a truncated file, and every run's code and data come from one
edit. A new digest under an unchanged version is said so in the reload's answer."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from harness import new_id, records_of, wait_until
from manager.core.events import Event

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]
ACTIVE = ("pending", "queued", "throttled", "running", "retrying")
MANIFEST = """\
name: churner
version: 1.0.0
triggers: [{topic: churn.v1, event_type: go}]
entrypoint: python main.py
image: titan-runtime:py3.11
timeout: 20
"""
# Long enough that a half of it is never valid Python by accident.
MAIN = """\
import json
EDIT = {n}
with open("data.txt") as fh:
    data = fh.read()
{padding}
print(json.dumps({{"topic": "churn.v1", "event_type": "done",
                  "payload": {{"edit": EDIT, "data": data, "end": "complete"}}}}))
"""


def main_py(n: int) -> bytes:
    padding = "\n".join(f"_unused_{i} = {{'n': {n}, 'i': {i}}}" for i in range(40))
    return MAIN.format(n=n, padding=padding).encode()


def write_in_chunks(path: Path, data: bytes, gap_s: float) -> None:
    """As an editor or rsync may: truncate, write half, pause, write the rest."""
    with path.open("wb") as fh:
        fh.write(data[:len(data) // 2])
        fh.flush()
        time.sleep(gap_s)
        fh.write(data[len(data) // 2:])


def test_reload_takes_a_plugin_only_once_it_has_settled(plugins_dir: Path, registry,
                                                        dispatcher, conn, settings) -> None:
    plugin = plugins_dir / "churner"
    plugin.mkdir()
    (plugin / "plugin.yaml").write_text(MANIFEST)
    (plugin / "data.txt").write_text("edit-0")
    (plugin / "main.py").write_bytes(main_py(0))
    time.sleep(settings.reload_settle_ms / 1000 + 0.1)
    stop = threading.Event()
    served: set[str] = set()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            write_in_chunks(plugin / "main.py", main_py(n), 0.03)
            time.sleep(0.02)
            write_in_chunks(plugin / "data.txt", f"edit-{n}".encode(), 0.03)
            time.sleep(1.0 if n % 4 == 0 else 0.05)  # now and then, long enough to settle

    def reloader() -> None:
        while not stop.is_set():
            registry.reload()
            entry = registry.get("churner")
            if entry and entry.digest:
                served.add(entry.digest)
            time.sleep(0.1)

    threads = [threading.Thread(target=writer), threading.Thread(target=reloader)]
    for t in threads:
        t.start()
    event_ids = []
    try:
        wait_until(lambda: registry.get("churner") is not None, 30, "churner to load")
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            event = Event(new_id("churn"), "churn.v1", "go")
            dispatcher.dispatch(event, registry.get("churner"), origin="api")
            event_ids.append(event.event_id)
            time.sleep(0.5)  # about 24 runs over the churn: enough versions, fewer cold runs
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    def finished() -> list[dict] | None:
        mine = [r for r in records_of(conn, settings, "churner", 500)
                if r["event_id"] in event_ids]
        done = len(mine) == len(event_ids) and all(r["status"] not in ACTIVE for r in mine)
        return mine if done else None

    try:
        records = wait_until(finished, 240, "every churner run to finish")
        assert len(served) > 1, "no update was ever taken: the test proved nothing"
        for record in records:
            assert record["status"] == "succeeded", (record["reason"], record["stderr"][-500:])
            (result,) = [json.loads(line) for line in record["stdout"].splitlines()]
            payload = result["payload"]
            assert payload["end"] == "complete", record
            assert payload["data"] == f"edit-{payload['edit']}", payload  # one edit, whole
    finally:
        shutil.rmtree(plugin)
        registry.reload()


def test_a_new_digest_under_the_same_version_is_a_warning(plugins_dir: Path, registry,
                                                          settings) -> None:
    plugin = plugins_dir / "samever"
    plugin.mkdir()
    (plugin / "plugin.yaml").write_text(MANIFEST.replace("churner", "samever"))
    (plugin / "data.txt").write_text("a")
    (plugin / "main.py").write_bytes(main_py(1))
    try:
        time.sleep(settings.reload_settle_ms / 1000 + 0.1)
        assert [a["name"] for a in registry.reload()["added"]] == ["samever"]
        (plugin / "main.py").write_bytes(main_py(2))
        time.sleep(settings.reload_settle_ms / 1000 + 0.1)
        (updated,) = registry.reload()["updated"]
        assert updated["from"]["version"] == updated["to"]["version"] == "1.0.0"
        assert "version 1.0.0 is unchanged but its content changed" in updated["warning"]
    finally:
        shutil.rmtree(plugin)
        registry.reload()
