"""Plugin loading: a directory on disk -> a checked PluginEntry and its bundle.

Files are read through descriptors once per read (no symlinks, devices, hardlinks or
sparse files); the manifest, the requirements and the bundle all come from those same
bytes. Which directories are read, and when they have settled: manager.plugins.discovery.
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
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from manager.core.errors import DependencyError, ManifestError
from manager.core.events import Event
from manager.core.groups import RuntimeSettings
from manager.core.run_groups import PluginSettings
from manager.core.runs import Isolation, RunRequest
from manager.plugins.deps import install_requirements
from manager.plugins.manifest import MANIFEST_NAME, NAME_RE, Manifest, manifest_from_files
from manager.plugins.permissions import check_globs
from manager.plugins.requirements import Requirements, parse_requirements
from manager.plugins.safefs import (
    O_DIR,
    TreeFile,
    TreeLimits,
    UnsafePath,
    fd,
    open_subdir,
    read_tree,
)
from manager.plugins.schedule import Schedule

REQUIREMENTS = "requirements.txt"


class PluginStatus(StrEnum):
    LOADED = "loaded"
    INVALID = "invalid"
    DRAFT = "draft"  # valid, marked `draft: true`: reloads leave it out of service


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
    # A serving entry whose directory now holds a draft: that draft's version.
    draft: str | None = None

    @property
    def runnable(self) -> bool:
        """In service: what events and triggers may run."""
        return self.status is PluginStatus.LOADED and self.manifest is not None

    @property
    def valid(self) -> bool:
        """Passes every check (a draft too): what `run` and `validate` accept."""
        return self.status is not PluginStatus.INVALID and self.manifest is not None

    @property
    def unavailable(self) -> str:
        """Why this entry takes no runs, in words that say what to do."""
        if self.status is PluginStatus.DRAFT:
            return (f"plugin {self.name!r} is a draft: reloads leave it out of service until "
                    f"the line `draft: true` is deleted from {self.path}/plugin.yaml (then "
                    "reload)")
        why = f": {'; '.join(self.errors)}" if self.errors else ""
        return f"plugin {self.name!r} is {self.status.value}{why}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["errors"] = list(self.errors)
        data["warnings"] = list(self.warnings)
        data["manifest"] = self.manifest.model_dump(mode="json") if self.manifest else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PluginEntry:
        """An entry as stored. One whose manifest today's rules refuse (stored by an older
        manager: a timer past the horizon) is read as invalid, naming why, so that it
        stops serving and every other plugin's listing, timers and runs go on."""
        fields = {k: data.get(k) for k in ("version", "digest", "rolled_back_from", "draft")}
        status, errors = PluginStatus(data["status"]), tuple(data.get("errors") or ())
        manifest = None
        try:
            if data.get("manifest"):
                manifest = Manifest.model_validate_json(json.dumps(data["manifest"]))
        except ValidationError as exc:
            status, errors = PluginStatus.INVALID, (*errors, *(
                f"stored manifest: {'.'.join(map(str, e['loc']))}: {e['msg']} (reload it)"
                for e in exc.errors()))
        return cls(name=data["name"], status=status, path=data["path"], errors=errors,
                   loaded_at=data.get("loaded_at", 0.0), manifest=manifest,
                   warnings=tuple(data.get("warnings") or ()), **fields)

    def public(self) -> dict[str, Any]:
        """The API's view of an entry."""
        m = self.manifest
        return {
            "name": self.name, "status": self.status.value, "version": self.version,
            "digest": self.digest, "errors": list(self.errors),
            "warnings": list(self.warnings), "path": self.path,
            "description": m.description if m else None,
            "triggers": [t.view(time.time()) if isinstance(t, Schedule) else t.model_dump()
                         for t in m.triggers] if m else [],
            "image": m.image if m else None, "timeout": m.timeout if m else None,
            "resources": m.resources.model_dump() if m else None,
            "permissions": m.permissions.model_dump(mode="json") if m else None,
            "loaded_at": self.loaded_at, "rolled_back_from": self.rolled_back_from,
            "draft": self.draft, "weight": m.weight if m else None,
        }

    def ref(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest}

    def request(self, event: Event, settings: PluginSettings, origin: str,
                invocation_id: str | None = None) -> RunRequest:
        """A run of this version on `event`, with everything the worker needs decided now
        from the checked manifest (never from the bundle's own plugin.yaml)."""
        m = self.manifest
        assert m is not None and self.digest and self.version, f"{self.name} is not runnable"
        return RunRequest(invocation_id=invocation_id or uuid.uuid4().hex, plugin=self.name,
                          version=self.version, digest=self.digest, image=m.image,
                          argv=tuple(m.argv), limits=m.run_limits(settings.limits),
                          allowed_globs=tuple(m.allowed_globs), retries=m.retries,
                          concurrency=m.concurrency, weight=m.weight, event=event,
                          origin=origin,
                          prewarm=m.prewarm, isolation=self.isolation(settings.runtime),
                          net_allow=m.net_allow, secrets=m.secrets)

    def isolation(self, runtime: RuntimeSettings) -> Isolation:
        """The manifest's choice, unless the operator runs every plugin under gVisor."""
        if runtime.isolation == Isolation.GVISOR:
            return Isolation.GVISOR
        return self.manifest.isolation if self.manifest else Isolation.CONTAINER


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


def plugin_requirements(files: list[TreeFile]) -> Requirements | None:
    """The plugin's own requirements.txt (read with its other files), validated."""
    data = next((f.data for f in files if f.path == REQUIREMENTS), None)
    return None if data is None else parse_requirements(data)


def read_plugin(plugin_dir: Path, settings: PluginSettings) -> list[TreeFile] | PluginEntry:
    """The plugin's files, or an invalid entry saying why they cannot be read."""
    name = plugin_dir.name
    if not re.fullmatch(NAME_RE, name):
        return PluginEntry(name, PluginStatus.INVALID, str(plugin_dir),
                           errors=(f"directory name {name!r} is not a valid plugin name",))
    try:
        with fd(os.open(plugin_dir.parent, O_DIR & ~os.O_NOFOLLOW)) as parent, \
                fd(open_subdir(parent, name, name)) as handle:
            return read_tree(handle, TreeLimits(settings.max_bundle_bytes,
                                                settings.max_plugin_files))
    except (UnsafePath, OSError) as exc:
        return PluginEntry(name, PluginStatus.INVALID, str(plugin_dir), errors=(f"files: {exc}",))


def load_plugin(plugin_dir: Path, settings: PluginSettings,
                install: bool = True) -> tuple[PluginEntry, bytes | None]:
    """Validates one plugin directory from one read; never raises for a bad plugin."""
    files = read_plugin(plugin_dir, settings)
    if isinstance(files, PluginEntry):
        return files, None
    return load_files(plugin_dir, files, settings, install)


def load_files(plugin_dir: Path, files: list[TreeFile], settings: PluginSettings,
               install: bool = True) -> tuple[PluginEntry, bytes | None]:
    """Validates a plugin's files (as read): manifest, limits, globs, requirements."""
    name = plugin_dir.name

    def invalid(*errors: str, version: str | None = None) -> tuple[PluginEntry, None]:
        return PluginEntry(name, PluginStatus.INVALID, str(plugin_dir), version=version,
                           errors=tuple(errors)), None

    manifest_bytes = next((f.data for f in files if f.path == MANIFEST_NAME), None)
    if manifest_bytes is None:
        return invalid(f"file: {MANIFEST_NAME} is missing")
    try:
        manifest = manifest_from_files(manifest_bytes, {f.path for f in files},
                                       f"{plugin_dir}/{MANIFEST_NAME}", name,
                                       settings.max_manifest_bytes)
    except ManifestError as exc:
        return invalid(*exc.errors)
    errors = (manifest.over_limits(settings.limits, settings.egress_allow)
              + check_globs(manifest.allowed_globs, settings.fs))
    try:
        reqs = plugin_requirements(files)
        if reqs is not None and install:
            install_requirements(reqs, settings.install)
    except DependencyError as exc:
        errors.append(exc.message)
    if errors:
        return invalid(*errors, version=manifest.version)
    digest, bundle = build_bundle(files)
    status = PluginStatus.DRAFT if manifest.draft else PluginStatus.LOADED
    entry = PluginEntry(name, status, str(plugin_dir), version=manifest.version,
                        digest=digest, manifest=manifest)
    return entry, bundle
