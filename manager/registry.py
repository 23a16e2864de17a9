"""Plugin discovery, content digests and bundles, and the registry kept in Redis.

The manager discovers `plugins/`, packs each valid plugin into a deterministic tar.gz
whose digest is the plugin's identity, and publishes entries and bundles to Redis. Every
process (API, listener, workers) reads the same registry from there; a worker fetches a
bundle by digest, so it needs no filesystem shared with the manager.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from manager.config import Settings
from manager.deps import install_requirements
from manager.errors import DependencyError, ManifestError, PluginNotFound, VersionNotFound
from manager.janitor import collect_bundles
from manager.keys import Keys
from manager.manifest import MANIFEST_NAME, NAME_RE, Manifest, manifest_from_files
from manager.permissions import check_globs
from manager.requirements import Requirements, parse_requirements
from manager.safefs import O_DIR, TreeFile, TreeLimits, UnsafePath, fd, open_subdir, read_tree

REQUIREMENTS = "requirements.txt"


class PluginStatus(StrEnum):
    LOADED = "loaded"
    INVALID = "invalid"


@dataclass(frozen=True)
class PluginEntry:
    """One plugin as the registry knows it."""

    name: str
    status: PluginStatus
    path: str
    version: str | None = None
    digest: str | None = None
    errors: tuple[str, ...] = ()
    manifest: Manifest | None = None
    warnings: tuple[str, ...] = ()
    loaded_at: float = field(default_factory=time.time)
    # Set after a rollback: the directory's digest that reloads must not put back.
    rolled_back_from: str | None = None

    @property
    def runnable(self) -> bool:
        return self.status is PluginStatus.LOADED and self.manifest is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["errors"] = list(self.errors)
        data["warnings"] = list(self.warnings)
        data["manifest"] = self.manifest.model_dump(mode="json") if self.manifest else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PluginEntry:
        manifest = data.get("manifest")
        return cls(
            name=data["name"], status=PluginStatus(data["status"]), path=data["path"],
            version=data.get("version"), digest=data.get("digest"),
            errors=tuple(data.get("errors") or ()), loaded_at=data.get("loaded_at", 0.0),
            warnings=tuple(data.get("warnings") or ()),
            rolled_back_from=data.get("rolled_back_from"),
            manifest=Manifest.model_validate_json(json.dumps(manifest)) if manifest else None,
        )

    def public(self) -> dict[str, Any]:
        """The API's view of an entry."""
        m = self.manifest
        return {
            "name": self.name, "status": self.status.value, "version": self.version,
            "digest": self.digest, "errors": list(self.errors),
            "warnings": list(self.warnings), "path": self.path,
            "description": m.description if m else None,
            "triggers": [t.model_dump() for t in m.triggers] if m else [],
            "image": m.image if m else None, "timeout": m.timeout if m else None,
            "resources": m.resources.model_dump() if m else None,
            "permissions": m.permissions.model_dump(mode="json") if m else None,
            "loaded_at": self.loaded_at, "rolled_back_from": self.rolled_back_from,
        }

    def ref(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest}


def build_bundle(files: list[TreeFile]) -> tuple[str, bytes]:
    """Packs a plugin's files into a deterministic tar.gz; returns (digest, bundle)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path)
            info.size = len(f.data)
            info.mode = 0o755 if f.executable else 0o644
            tar.addfile(info, io.BytesIO(f.data))
    tar_bytes = raw.getvalue()
    digest = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    return digest, gzip.compress(tar_bytes, compresslevel=6, mtime=0)


def check_limits(manifest: Manifest, settings: Settings) -> list[str]:
    """Resources the operator does not allow (SPEC §3: at most the operator's maximum)."""
    errors = []
    if manifest.timeout > settings.max_timeout:
        errors.append(f"timeout: {manifest.timeout}s is above the maximum {settings.max_timeout}s")
    if manifest.memory_bytes > settings.max_memory_bytes:
        errors.append(f"resources.memory: {manifest.resources.memory} is above the maximum "
                      f"{settings.max_memory_bytes} bytes")
    if manifest.cpu_millis > settings.max_cpu_millis:
        errors.append(f"resources.cpu: {manifest.resources.cpu} is above the maximum "
                      f"{settings.max_cpu_millis}m")
    return errors


def plugin_requirements(files: list[TreeFile]) -> Requirements | None:
    """The plugin's own requirements.txt (read with its other files), validated."""
    data = next((f.data for f in files if f.path == REQUIREMENTS), None)
    return None if data is None else parse_requirements(data)


def load_plugin(plugin_dir: Path, settings: Settings,
                install: bool = True) -> tuple[PluginEntry, bytes | None]:
    """Validates one plugin directory; never raises for a bad plugin. Files are read
    through descriptors once (no symlinks, devices, hardlinks or sparse files); the
    manifest, the requirements and the bundle all come from those same bytes."""
    name = plugin_dir.name

    def invalid(*errors: str, version: str | None = None) -> tuple[PluginEntry, None]:
        return PluginEntry(name, PluginStatus.INVALID, str(plugin_dir), version=version,
                           errors=tuple(errors)), None

    if not re.match(NAME_RE, name):
        return invalid(f"directory name {name!r} is not a valid plugin name")
    try:
        with fd(os.open(plugin_dir.parent, O_DIR & ~os.O_NOFOLLOW)) as parent, \
                fd(open_subdir(parent, name, name)) as handle:
            files = read_tree(handle, TreeLimits(settings.max_bundle_bytes,
                                                 settings.max_plugin_files))
    except (UnsafePath, OSError) as exc:
        return invalid(f"files: {exc}")
    manifest_bytes = next((f.data for f in files if f.path == MANIFEST_NAME), None)
    if manifest_bytes is None:
        return invalid(f"file: {MANIFEST_NAME} is missing")
    try:
        manifest = manifest_from_files(manifest_bytes, {f.path for f in files},
                                       f"{plugin_dir}/{MANIFEST_NAME}", name,
                                       settings.max_manifest_bytes)
    except ManifestError as exc:
        return invalid(*exc.errors)
    errors = check_limits(manifest, settings) + check_globs(manifest.allowed_globs, settings)
    try:
        reqs = plugin_requirements(files)
        if reqs is not None and install:
            install_requirements(reqs, settings)
    except DependencyError as exc:
        errors.append(exc.message)
    if errors:
        return invalid(*errors, version=manifest.version)
    digest, bundle = build_bundle(files)
    entry = PluginEntry(name, PluginStatus.LOADED, str(plugin_dir), version=manifest.version,
                        digest=digest, manifest=manifest)
    return entry, bundle


def image_warning(entry: PluginEntry, images: set[str] | None, settings: Settings,
                  where: str = "any worker's Docker engine") -> str | None:
    """Why runs of this plugin would fail for want of its image (None: fine, or unknown)."""
    image = entry.manifest.image if entry.manifest else None
    if not image or images is None or image in images or f"{image}:latest" in images:
        return None
    return (f"image: {image!r} is not present on {where}; runs will fail until it is. "
            f"Use image: {settings.runtime_image} (built by make up), or build or load "
            f"{image!r} on the workers")


def discover(plugins_dir: Path, settings: Settings) -> dict[str, tuple[PluginEntry, bytes | None]]:
    """Loads every plugin directory; one bad plugin never stops the others. A symlink in
    place of a plugin directory is reported, never followed."""
    found: dict[str, tuple[PluginEntry, bytes | None]] = {}
    if not plugins_dir.is_dir():
        return found
    with os.scandir(plugins_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for item in entries:
        if item.name.startswith((".", "_")):
            continue
        path = plugins_dir / item.name
        if item.is_symlink() and item.is_dir():
            found[item.name] = (PluginEntry(item.name, PluginStatus.INVALID, str(path), errors=(
                "files: the plugin directory is a symlink; plugins may not be symlinks",)), None)
        elif item.is_dir(follow_symlinks=False):
            found[item.name] = load_plugin(path, settings)
    return found


class Registry:
    """The shared registry in Redis; takes its connection as a parameter.

    A reload publishes every change in one MULTI, so readers switch atomically. A broken
    new version never replaces a working one: the old one keeps serving, with the new
    one's errors shown. The last HISTORY versions of each plugin stay in the store."""

    HISTORY = 5

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._cache: tuple[int, dict[str, PluginEntry]] | None = None

    def reload(self, plugins_dir: Path | None = None) -> dict[str, list[Any]]:
        """Discovers plugins and publishes them; returns what changed."""
        found = discover(plugins_dir or self.settings.plugins_dir, self.settings)
        old = self.entries(fresh=True)
        images = self.worker_images()
        changes: dict[str, list[Any]] = {"added": [], "updated": [], "removed": [],
                                         "rejected": [], "warnings": []}
        pipe = self.conn.pipeline()
        for name, (entry, bundle) in found.items():
            warning = image_warning(entry, images, self.settings)
            if warning:
                entry = replace(entry, warnings=(warning,))
                changes["warnings"].append({"name": name, "warnings": [warning]})
            before = old.get(name)
            if not entry.runnable:
                kept = before if before and before.runnable else None
                changes["rejected"].append({"name": name, "errors": list(entry.errors),
                                            "serving": kept.ref() if kept else None})
                entry = replace(kept, errors=entry.errors) if kept else entry
            elif before and before.rolled_back_from == entry.digest:
                entry = replace(before, errors=())  # stays rolled back until the dir changes
            else:
                if before is None or not before.runnable:
                    changes["added"].append({"name": name, **entry.ref()})
                elif before.digest != entry.digest:
                    changes["updated"].append({"name": name, "from": before.ref(),
                                               "to": entry.ref()})
                if bundle is not None and entry.digest:
                    pipe.set(self.keys.bundle(entry.digest), bundle, nx=True)
                if before is None or before.digest != entry.digest:
                    self._remember(pipe, entry, before)
            pipe.hset(self.keys.registry, name, json.dumps(entry.to_dict()))
        changes["removed"] = sorted(set(old) - set(found))
        if changes["removed"]:
            pipe.hdel(self.keys.registry, *changes["removed"])
        pipe.incr(self.keys.registry_version)
        pipe.execute()
        collect_bundles(self.conn, self.keys)
        return changes

    def worker_images(self) -> set[str] | None:
        """Images on the engines of live workers (from their heartbeats); None when no
        worker reports, so nothing can be said."""
        images: set[str] = set()
        reporting = False
        for key in self.conn.scan_iter(match=self.keys.worker_pattern, count=100):
            raw = self.conn.get(key)
            beat = json.loads(raw) if raw else {}
            if beat.get("docker", {}).get("ok") and "images" in beat:
                reporting = True
                images.update(beat["images"])
        return images if reporting else None

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
        pipe.incr(self.keys.registry_version)
        pipe.execute()
        return {"name": name, "from": current.ref(), "to": target.ref()}

    def version(self) -> int:
        return int(self.conn.get(self.keys.registry_version) or 0)

    def entries(self, fresh: bool = False) -> dict[str, PluginEntry]:
        """All entries; cached until the registry version moves."""
        version = self.version()
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
