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
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from manager.config import Settings
from manager.errors import ManifestError
from manager.keys import Keys
from manager.manifest import NAME_RE, Manifest, load_manifest

SKIP_NAMES = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache"}


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
    loaded_at: float = field(default_factory=time.time)

    @property
    def runnable(self) -> bool:
        return self.status is PluginStatus.LOADED and self.manifest is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["errors"] = list(self.errors)
        data["manifest"] = self.manifest.model_dump(mode="json") if self.manifest else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PluginEntry:
        manifest = data.get("manifest")
        return cls(
            name=data["name"], status=PluginStatus(data["status"]), path=data["path"],
            version=data.get("version"), digest=data.get("digest"),
            errors=tuple(data.get("errors") or ()), loaded_at=data.get("loaded_at", 0.0),
            manifest=Manifest.model_validate_json(json.dumps(manifest)) if manifest else None,
        )

    def public(self) -> dict[str, Any]:
        """The API's view of an entry."""
        m = self.manifest
        return {
            "name": self.name, "status": self.status.value, "version": self.version,
            "digest": self.digest, "errors": list(self.errors), "path": self.path,
            "description": m.description if m else None,
            "triggers": [t.model_dump() for t in m.triggers] if m else [],
            "image": m.image if m else None, "timeout": m.timeout if m else None,
            "resources": m.resources.model_dump() if m else None,
            "permissions": m.permissions.model_dump(mode="json") if m else None,
            "loaded_at": self.loaded_at,
        }


def _plugin_files(plugin_dir: Path) -> list[Path]:
    """Files of a plugin in a stable order; symlinks are refused (they could leave the dir)."""
    files = []
    for path in sorted(plugin_dir.rglob("*")):
        rel = path.relative_to(plugin_dir)
        if any(part in SKIP_NAMES for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise ValueError(f"{rel} is a symlink; plugins may not contain symlinks")
        if path.is_file():
            files.append(path)
    return files


def build_bundle(plugin_dir: Path, max_bytes: int) -> tuple[str, bytes]:
    """Packs a plugin directory into a deterministic tar.gz; returns (digest, bundle)."""
    raw = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _plugin_files(plugin_dir):
            data = path.read_bytes()
            total += len(data)
            if total > max_bytes:
                raise ValueError(f"plugin directory is larger than {max_bytes} bytes")
            info = tarfile.TarInfo(str(path.relative_to(plugin_dir)))
            info.size = len(data)
            info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    digest = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    return digest, gzip.compress(tar_bytes, compresslevel=6, mtime=0)


def bundle_digest(bundle: bytes) -> str:
    return "sha256:" + hashlib.sha256(gzip.decompress(bundle)).hexdigest()


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


def load_plugin(plugin_dir: Path, settings: Settings) -> tuple[PluginEntry, bytes | None]:
    """Validates one plugin directory; never raises for a bad plugin."""
    name = plugin_dir.name
    if not re.match(NAME_RE, name):
        return PluginEntry(name, PluginStatus.INVALID, str(plugin_dir),
                           errors=(f"directory name {name!r} is not a valid plugin name",)), None
    try:
        manifest = load_manifest(plugin_dir, settings.max_manifest_bytes)
    except ManifestError as exc:
        return PluginEntry(name, PluginStatus.INVALID, str(plugin_dir),
                           errors=tuple(exc.errors)), None
    errors = check_limits(manifest, settings)
    digest, bundle = None, None
    try:
        digest, bundle = build_bundle(plugin_dir, settings.max_bundle_bytes)
    except (OSError, ValueError) as exc:
        errors.append(f"files: {exc}")
    if errors:
        return PluginEntry(name, PluginStatus.INVALID, str(plugin_dir), version=manifest.version,
                           errors=tuple(errors)), None
    entry = PluginEntry(name, PluginStatus.LOADED, str(plugin_dir), version=manifest.version,
                        digest=digest, manifest=manifest)
    return entry, bundle


def discover(plugins_dir: Path, settings: Settings) -> dict[str, tuple[PluginEntry, bytes | None]]:
    """Loads every plugin directory; one bad plugin never stops the others."""
    found: dict[str, tuple[PluginEntry, bytes | None]] = {}
    if not plugins_dir.is_dir():
        return found
    for path in sorted(plugins_dir.iterdir()):
        if path.is_dir() and not path.name.startswith((".", "_")):
            found[path.name] = load_plugin(path, settings)
    return found


class Registry:
    """The shared registry in Redis; takes its connection as a parameter."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._cache: tuple[int, dict[str, PluginEntry]] | None = None

    def reload(self, plugins_dir: Path | None = None) -> dict[str, list[Any]]:
        """Discovers plugins and publishes them; returns what changed."""
        found = discover(plugins_dir or self.settings.plugins_dir, self.settings)
        old = self.entries(fresh=True)
        pipe = self.conn.pipeline()
        for entry, bundle in found.values():
            if bundle is not None and entry.digest:
                pipe.set(self.keys.bundle(entry.digest), bundle, nx=True)
            pipe.hset(self.keys.registry, entry.name, json.dumps(entry.to_dict()))
        removed = sorted(set(old) - set(found))
        if removed:
            pipe.hdel(self.keys.registry, *removed)
        pipe.incr(self.keys.registry_version)
        pipe.execute()
        return _diff(old, {name: entry for name, (entry, _) in found.items()}, removed)

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


def _diff(old: dict[str, PluginEntry], new: dict[str, PluginEntry],
          removed: list[str]) -> dict[str, list[Any]]:
    added, updated, rejected = [], [], []
    for name, entry in new.items():
        if not entry.runnable:
            rejected.append({"name": name, "errors": list(entry.errors)})
            continue
        before = old.get(name)
        if before is None or not before.runnable:
            added.append({"name": name, "version": entry.version, "digest": entry.digest})
        elif before.digest != entry.digest:
            updated.append({"name": name, "from": {"version": before.version,
                                                   "digest": before.digest},
                            "to": {"version": entry.version, "digest": entry.digest}})
    return {"added": added, "updated": updated, "removed": removed, "rejected": rejected}
