"""Bounded disk and a bounded store: a host's cache is evicted least recently used past
`cache_max_bytes`, and bundles in Redis that no kept version names are deleted.

Cache entries (plugin code by digest, installed requirements by content) are marked used
(their mtime) each time a run or a reload takes them. An entry is evicted only when it
has not been used for longer than a run plus a prewarmed container's idle time can last,
so nothing a container has mounted is ever taken away; it is renamed out of place under
the same lock that creates it, then removed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from manager.core.keys import Keys
from manager.core.run_groups import CacheSettings
from manager.plugins.safefs import locked, private_root

log = logging.getLogger(__name__)
MARGIN_S = 60


@dataclass(frozen=True)
class Entry:
    path: Path
    lock: Path
    size: int
    used: float


def tree_size(path: Path) -> int:
    """Bytes on disk under `path` (never following a symlink)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


class CacheJanitor:
    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings

    @property
    def min_idle_s(self) -> float:
        """Longer than any run and any prewarmed container's wait can hold an entry."""
        return self.settings.held_s + MARGIN_S

    def entries(self) -> list[Entry]:
        root = private_root(self.settings.dir)
        found = []
        for kind, lock_name in (("plugins", "{name}.lock"), ("deps", "deps-{name}.lock")):
            base = root / kind
            if not base.is_dir():
                continue
            for item in base.iterdir():
                if item.name.startswith(".") or not item.is_dir() or item.is_symlink():
                    continue
                found.append(Entry(item, root / "locks" / lock_name.format(name=item.name),
                                   tree_size(item), item.lstat().st_mtime))
        return found

    def evict(self, now: float | None = None) -> list[str]:
        """Removes the least recently used entries until the cache fits; returns them."""
        now = time.time() if now is None else now
        entries = sorted(self.entries(), key=lambda e: e.used)
        total = sum(e.size for e in entries)
        evicted: list[str] = []
        for entry in entries:
            if total <= self.settings.max_bytes:
                break
            if now - entry.used < self.min_idle_s:
                break  # everything after it is newer still
            if self._remove(entry, now):
                total -= entry.size
                evicted.append(entry.path.name)
        if evicted:
            log.info("cache: evicted %d entr%s: %s", len(evicted),
                     "y" if len(evicted) == 1 else "ies", ", ".join(evicted))
        return evicted

    def _remove(self, entry: Entry, now: float) -> bool:
        trash = entry.path.parent / f".evicted-{secrets.token_hex(6)}"
        with locked(entry.lock):
            try:  # used since it was listed: keep it
                if now - entry.path.lstat().st_mtime < self.min_idle_s:
                    return False
                os.rename(entry.path, trash)
            except FileNotFoundError:
                return False
        shutil.rmtree(trash, ignore_errors=True)
        return True


def collect_bundles(conn: redis.Redis, keys: Keys) -> list[str]:
    """Deletes bundles that neither the registry nor any plugin's kept versions name.
    Optimistic: if the registry changes meanwhile (its version counter moves), nothing is
    deleted this time. Returns the digests deleted."""
    with conn.pipeline() as pipe:
        try:
            pipe.watch(keys.registry_version)
            referenced = set()
            for raw in pipe.hvals(keys.registry):
                referenced.add(_digest_of(raw))
            for key in pipe.scan_iter(match=keys.versions_pattern, count=200):
                referenced.update(_digest_of(raw) for raw in pipe.lrange(key, 0, -1))
            prefix = keys.bundle("")
            stale = [k for k in pipe.scan_iter(match=keys.bundle("*"), count=200)
                     if k.decode()[len(prefix):] not in referenced]
            pipe.multi()
            if stale:
                pipe.delete(*stale)
            pipe.execute()
        except redis.WatchError:
            return []
    return [k.decode()[len(prefix):] for k in stale]


def _digest_of(raw: bytes) -> str:
    return str(json.loads(raw).get("digest") or "")
