"""The registry kept in Redis: what `manager.plugins.loader` found, published for every process.

The manager discovers `plugins/`, packs each valid plugin into a deterministic tar.gz
whose digest is the plugin's identity, and publishes entries and bundles to Redis. Every
process (API, listener, workers) reads the same registry from there; a worker fetches a
bundle by digest, so it needs no filesystem shared with the manager.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from manager.core.errors import PluginNotFound, VersionNotFound
from manager.core.secrets import SecretStore
from manager.core.wiring import Wiring
from manager.plugins.discovery import discover
from manager.plugins.engines import Engines
from manager.plugins.janitor import collect_bundles
from manager.plugins.loader import PluginEntry, PluginStatus


class Registry:
    """The shared registry in Redis; takes its connection as a parameter.

    A reload publishes every change in one MULTI, so readers switch atomically. A broken
    new version never replaces a working one: the old one keeps serving, with the new
    one's errors shown. The last HISTORY versions of each plugin stay in the store."""

    HISTORY = 5

    def __init__(self, wiring: Wiring, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # when a timer comes into service (tests bring their own)
        self.conn = wiring.conn
        self.settings = wiring.settings
        self.keys = wiring.keys
        self._cache: tuple[int, dict[str, PluginEntry]] | None = None

    def secret_warnings(self, entry: PluginEntry) -> tuple[str, ...]:
        """A plugin that lists secrets not set for it: its runs fail until they are."""
        names = entry.manifest.secrets if entry.manifest else ()
        store = SecretStore(self.conn, self.keys, self.settings.secrets_key)
        return tuple(f"secrets: {n!r} is not set for {entry.name}; its runs fail until it "
                     f"is: titan-plugins.py secret set {n} --plugin {entry.name}"
                     for n in store.unbound(entry.name, names))

    def reload(self, plugins_dir: Path | None = None) -> dict[str, list[Any]]:
        """Discovers plugins and publishes them; returns what changed. A plugin whose
        directory is still being written keeps its old version (`unsettled`)."""
        found = discover(plugins_dir or self.settings.plugins_dir, self.settings.plugin)
        old = self.entries(fresh=True)
        engines = self.worker_engines()
        changes: dict[str, list[Any]] = {"added": [], "updated": [], "removed": [],
                                         "rejected": [], "drafts": [], "warnings": [],
                                         "unsettled": []}
        pipe = self.conn.pipeline()
        published: dict[str, PluginEntry] = {}
        for name, (entry, bundle) in found.found.items():
            warnings = engines.warnings(entry, self.settings.runtime) + self.secret_warnings(entry)
            if warnings:
                entry = replace(entry, warnings=warnings)
                changes["warnings"].append({"name": name, "warnings": list(warnings)})
            entry = self._changed(name, entry, bundle, old.get(name), changes, pipe)
            published[name] = entry
            pipe.hset(self.keys.registry, name, json.dumps(entry.to_dict()))
        for name in found.unsettled:
            before = old.get(name)
            changes["unsettled"].append({"name": name, "serving": before.ref() if before
                                         and before.runnable else None})
        changes["removed"] = sorted(set(old) - set(found.found) - set(found.unsettled))
        if changes["removed"]:
            pipe.hdel(self.keys.registry, *changes["removed"])
        unsettled = {n: old[n] for n in found.unsettled if n in old}
        self._timers(pipe, old, {**published, **unsettled})
        pipe.incr(self.keys.registry_version)
        pipe.execute()
        collect_bundles(self.conn, self.keys)
        return changes

    def _changed(self, name: str, entry: PluginEntry, bundle: bytes | None,
                 before: PluginEntry | None, changes: dict[str, list[Any]],
                 pipe: Any) -> PluginEntry:
        """The entry to publish for one plugin found on disk, noting what changed."""
        kept = before if before and before.runnable else None
        if entry.status is PluginStatus.DRAFT:  # out of service until its author says so
            changes["drafts"].append({"name": name, **entry.ref(),
                                      "serving": kept.ref() if kept else None})
            return replace(kept, errors=(), draft=entry.version) if kept else entry
        if not entry.runnable:
            changes["rejected"].append({"name": name, "errors": list(entry.errors),
                                        "serving": kept.ref() if kept else None})
            return replace(kept, errors=entry.errors, draft=None) if kept else entry
        if before and before.rolled_back_from == entry.digest:
            return replace(before, errors=(), draft=None)  # rolled back until the dir changes
        if before is None or not before.runnable:
            changes["added"].append({"name": name, **entry.ref()})
        elif before.digest != entry.digest:
            update = {"name": name, "from": before.ref(), "to": entry.ref()}
            if before.version == entry.version:
                update["warning"] = (f"version {entry.version} is unchanged but its content "
                                     "changed: bump the version so records and result "
                                     "events tell the two apart")
                changes["warnings"].append({"name": name, "warnings": [update["warning"]]})
            changes["updated"].append(update)
        if bundle is not None and entry.digest:
            pipe.set(self.keys.bundle(entry.digest), bundle, nx=True)
        if before is None or before.digest != entry.digest:
            self._remember(pipe, entry, before)
        return entry

    def _timers(self, pipe: Any, before: dict[str, PluginEntry],
                after: dict[str, PluginEntry]) -> None:
        """In the registry's own transaction: a timer that comes into service (a new or
        changed schedule, a rollback's) starts at its next tick; one that leaves forgets
        its ticks, so a schedule that comes back never fires for the time it was away."""
        old, new = timers_of(before), timers_of(after)
        for timer in new - old:
            pipe.hset(self.keys.timer_since, timer, repr(self.clock()))
            pipe.hdel(self.keys.timer_fired, timer)
        if old - new:
            pipe.hdel(self.keys.timer_since, *(old - new))
            pipe.hdel(self.keys.timer_fired, *(old - new))

    def worker_engines(self) -> Engines:
        """What the live workers' engines can run (from their heartbeats)."""
        return Engines.of_workers(self.conn, self.keys)

    def _remember(self, pipe: Any, entry: PluginEntry, before: PluginEntry | None) -> None:
        """Puts a version at the head of the plugin's history (one per digest); the version
        it replaces is kept too, even if it was loaded before history was recorded."""
        kept = self.versions(entry.name)
        if before is not None and before.runnable and before.digest not in {e.digest for e in kept}:
            kept.insert(0, replace(before, errors=()))
        kept = [e for e in kept if e.digest != entry.digest]
        key = self.keys.plugin_versions(entry.name)
        pipe.delete(key)
        pipe.rpush(key, *(json.dumps(e.to_dict()) for e in [entry, *kept][:self.HISTORY]))

    def versions(self, name: str) -> list[PluginEntry]:
        """Kept versions of a plugin, newest first."""
        return [PluginEntry.from_dict(json.loads(raw))
                for raw in self.conn.lrange(self.keys.plugin_versions(name), 0, -1)]

    def rollback(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Puts a kept version back in service (by default the one before the current)."""
        current = self.get(name)
        if current is None:
            raise PluginNotFound(f"no plugin named {name!r}", plugin=name)
        kept = self.versions(name)
        candidates = [e for e in kept if e.digest != current.digest and
                      (version is None or version in (e.version, e.digest))]
        if not candidates:
            raise VersionNotFound(
                f"no kept version {version!r} of {name!r}" if version else
                f"{name!r} has no earlier version to roll back to", plugin=name,
                kept=[e.ref() for e in kept])
        target = replace(candidates[0], errors=(), loaded_at=time.time(),
                         rolled_back_from=current.rolled_back_from or current.digest)
        pipe = self.conn.pipeline()
        pipe.hset(self.keys.registry, name, json.dumps(target.to_dict()))
        self._timers(pipe, {name: current}, {name: target})
        pipe.incr(self.keys.registry_version)
        pipe.execute()
        return {"name": name, "from": current.ref(), "to": target.ref()}

    def version(self) -> int:
        return int(self.conn.get(self.keys.registry_version) or 0)

    def entries(self, fresh: bool = False, version: int | None = None,
                ) -> dict[str, PluginEntry]:
        """All entries; cached until the registry version moves. `version`: the version
        the caller has just read with other commands (the listener, with its batch)."""
        version = self.version() if version is None else version
        if not fresh and self._cache and self._cache[0] == version:
            return self._cache[1]
        raw = self.conn.hgetall(self.keys.registry)
        entries = {k.decode(): PluginEntry.from_dict(json.loads(v)) for k, v in raw.items()}
        self._cache = (version, entries)
        return entries

    def get(self, name: str) -> PluginEntry | None:
        return self.entries().get(name)

    def bundle(self, digest: str) -> bytes | None:
        return self.conn.get(self.keys.bundle(digest))


def timers_of(entries: dict[str, PluginEntry]) -> set[str]:
    """The timers in service: `plugin:key` of each schedule of each runnable entry."""
    return {schedule.timer(name) for name, entry in entries.items()
            if entry.runnable and entry.manifest is not None
            for schedule in entry.manifest.schedules}
