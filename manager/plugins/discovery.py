"""Discovery: every plugin directory under the plugins directory, each loaded once it
has settled. A reload takes a directory only once two reads a short interval apart give
the same content, whatever the clocks and mtimes say. A directory that is being written
(an editor, `git checkout`, `rsync`) keeps its old version serving, and is tried again
shortly. One bad plugin never stops the others."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager.core.run_groups import PluginSettings
from manager.plugins.loader import PluginEntry, PluginStatus, load_files, read_plugin
from manager.plugins.safefs import TreeFile

SETTLE_TRIES = 4  # a directory still changing after this many reads keeps its old version


def plugin_dirs(plugins_dir: Path) -> dict[str, Path | PluginEntry]:
    """Every plugin directory by name; a symlink in place of one is reported, never
    followed."""
    found: dict[str, Path | PluginEntry] = {}
    if not plugins_dir.is_dir():
        return found
    with os.scandir(plugins_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for item in entries:
        if item.name.startswith((".", "_")):
            continue
        path = plugins_dir / item.name
        if item.is_symlink() and item.is_dir():
            found[item.name] = PluginEntry(item.name, PluginStatus.INVALID, str(path), errors=(
                "files: the plugin directory is a symlink; plugins may not be symlinks",))
        elif item.is_dir(follow_symlinks=False):
            found[item.name] = path
    return found


@dataclass
class Discovery:
    """What a reload found: loaded or invalid plugins, and those still being written."""

    found: dict[str, tuple[PluginEntry, bytes | None]] = field(default_factory=dict)
    unsettled: list[str] = field(default_factory=list)


def _fingerprint(read: list[TreeFile] | PluginEntry) -> Any:
    """A directory's content as one value: each file's path, mode and SHA-256."""
    if isinstance(read, PluginEntry):
        return read.errors
    return [(f.path, f.executable, hashlib.sha256(f.data).digest()) for f in read]


def discover(plugins_dir: Path, settings: PluginSettings) -> Discovery:
    """Loads every plugin directory that has settled: two reads `reload_settle_ms` apart
    with the same content, whatever the clocks and mtimes say (a file dated in the future
    would otherwise never look quiet). One bad plugin never stops the others. Directories
    still changing are read again, up to SETTLE_TRIES times; the caller retries the rest
    later (manager.plugins.watch.SettleRetry)."""
    settle = settings.settle_ms / 1000
    dirs = plugin_dirs(plugins_dir)
    result = Discovery({n: (d, None) for n, d in dirs.items() if isinstance(d, PluginEntry)})
    pending = [n for n, d in dirs.items() if isinstance(d, Path)]
    first = {n: read_plugin(dirs[n], settings) for n in pending}  # type: ignore[arg-type]
    for _ in range(SETTLE_TRIES):
        if not pending:
            break
        time.sleep(settle)
        still = []
        for name in pending:
            again = read_plugin(dirs[name], settings)  # type: ignore[arg-type]
            if _fingerprint(first[name]) != _fingerprint(again):
                still.append(name)
                first[name] = again  # the next try compares with this read
            elif isinstance(again, PluginEntry):
                result.found[name] = (again, None)
            else:
                result.found[name] = load_files(dirs[name], again, settings)  # type: ignore[arg-type]
        pending = still
    result.unsettled = pending
    return result
