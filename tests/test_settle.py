"""Reload never serves a half-written plugin, judged by content alone: while a writer
rewrites main.py and data.txt in chunks and reloads run without pause, every version the
registry stores is one whole edit (code complete, data of the same edit); a file dated in
the future is taken once its content settles; a directory still being written is tried
again until it settles, not once; a new digest under an unchanged version is said so."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from harness import isolated, wait_until
from manager.core.retry import Backoff
from manager.plugins.registry import Registry
from manager.plugins.safefs import bundle_members, gunzip_bounded
from manager.plugins.watch import SettleRetry

MANIFEST = """\
name: {name}
version: {version}
triggers: [{{topic: churn.v1, event_type: go}}]
entrypoint: python main.py
image: titan-runtime:py3.11
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


def plugin(root: Path, name: str, version: str = "1.0.0", n: int = 0) -> Path:
    directory = root / name
    directory.mkdir(exist_ok=True)
    (directory / "plugin.yaml").write_text(MANIFEST.format(name=name, version=version))
    (directory / "data.txt").write_text(f"edit-{n}")
    (directory / "main.py").write_bytes(main_py(n))
    return directory


def stored(registry: Registry, digest: str) -> dict[str, bytes]:
    raw = gunzip_bounded(registry.bundle(digest), 1 << 24)
    return {name: data for name, _, data in bundle_members(raw, 1 << 24) if data is not None}


@pytest.fixture
def own(conn, unit_settings, tmp_path: Path) -> tuple[Path, Registry]:
    """A plugins directory and a registry of this test's own."""
    root = tmp_path / "plugins"
    root.mkdir()
    _, registry = isolated(unit_settings, conn, plugins_dir=root)
    return root, registry


def test_reload_stores_only_whole_edits_while_a_writer_churns(own) -> None:
    root, registry = own
    directory = plugin(root, "churner")
    stop = threading.Event()
    served: set[str] = set()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            write_in_chunks(directory / "main.py", main_py(n), 0.03)
            time.sleep(0.02)
            write_in_chunks(directory / "data.txt", f"edit-{n}".encode(), 0.03)
            time.sleep(1.0 if n % 3 == 0 else 0.05)  # now and then, long enough to settle

    def reloader() -> None:
        while not stop.is_set():
            registry.reload()
            entry = registry.get("churner")
            if entry and entry.digest:
                served.add(entry.digest)

    threads = [threading.Thread(target=writer), threading.Thread(target=reloader)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(served) >= 4, 60, "four versions to be taken")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    for digest in served:
        files = stored(registry, digest)
        code = files["main.py"].decode()
        compile(code, "main.py", "exec")  # whole: never a truncated file
        assert '"end": "complete"' in code
        edit = int(code.split("EDIT = ", 1)[1].split("\n", 1)[0])
        assert files["data.txt"].decode() == f"edit-{edit}", (edit, files["data.txt"])


def test_a_file_dated_in_the_future_is_taken_once_its_content_settles(own) -> None:
    root, registry = own
    directory = plugin(root, "dated")
    assert [a["name"] for a in registry.reload()["added"]] == ["dated"]
    plugin(root, "dated", version="1.0.1", n=1)
    future = time.mktime((2030, 1, 1, 0, 0, 0, 0, 0, -1))
    for f in directory.iterdir():
        os.utime(f, (future, future))
    changes = registry.reload()
    assert changes["unsettled"] == [], changes
    (updated,) = changes["updated"]
    assert updated["to"]["version"] == "1.0.1"


def test_a_directory_still_being_written_is_tried_until_it_settles(caplog) -> None:
    answers = [["busy"], ["busy"], ["busy"], []]  # unsettled three times, then settled
    reloads: list[int] = []
    done = threading.Event()

    def reload() -> None:
        reloads.append(1)
        names = answers.pop(0)
        if names:
            retry.unsettled(names)
        else:
            retry.settled()
            done.set()

    retry = SettleRetry(reload, Backoff(first=0.01, cap=0.05))
    caplog.set_level(logging.WARNING, "manager.plugins.watch")
    reload()
    assert done.wait(10), f"gave up after {len(reloads)} reloads"
    assert len(reloads) == 4 and retry.attempts == 0
    attempts = [r.getMessage() for r in caplog.records if "reload attempt" in r.getMessage()]
    assert [a.split("reload attempt ")[1].split(" ")[0] for a in attempts] == ["1", "2", "3"]
    assert all("busy" in a for a in attempts)


def test_a_new_digest_under_the_same_version_is_a_warning(own) -> None:
    root, registry = own
    directory = plugin(root, "samever")
    assert [a["name"] for a in registry.reload()["added"]] == ["samever"]
    (directory / "main.py").write_bytes(main_py(2))
    (updated,) = registry.reload()["updated"]
    assert updated["from"]["version"] == updated["to"]["version"] == "1.0.0"
    assert "version 1.0.0 is unchanged but its content changed" in updated["warning"]
