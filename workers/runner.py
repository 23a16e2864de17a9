"""One invocation from task to record: code, permissions, requirements, sandbox, results."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from manager import metrics
from manager.config import Settings
from manager.errors import BundleError, DependencyError, ManifestError, PermissionDenied
from manager.events import Event
from manager.manifest import load_manifest
from manager.permissions import check_payload_path, mount_sources
from manager.records import RecordStore, Status
from manager.registry import Registry
from workers.plugin_cache import PluginCache
from workers.results import Invocation, Publisher
from workers.sandbox import RunSpec, Sandbox

log = logging.getLogger(__name__)


class Runner:
    """Per worker process: owns the Sandbox (one Docker client) and the host's caches."""

    def __init__(self, conn: redis.Redis, settings: Settings, sandbox: Sandbox) -> None:
        self.conn = conn
        self.settings = settings
        self.sandbox = sandbox
        self.records = RecordStore(conn, settings)
        self.publisher = Publisher(conn, settings)
        self.cache = PluginCache(Registry(conn, settings), settings)

    def start(self, invocation_id: str, attempt: int,
              worker: str | None = None) -> dict[str, Any] | None:
        """Marks the record running; None when it already finished (a duplicate delivery)."""
        record = self.records.get(invocation_id)
        if record and Status(record["status"]).terminal:
            log.info("invocation %s already %s; skipping", invocation_id, record["status"])
            return None
        return self.records.update(invocation_id, status=Status.RUNNING.value,
                                   attempts=attempt, worker=worker or self.settings.worker_name,
                                   worker_pid=os.getpid(), started_at=time.time())

    def run(self, inv: Invocation, digest: str) -> dict[str, Any]:
        """Runs the exact content `digest`; SandboxUnavailable propagates for a retry."""
        try:
            code_dir = self.cache.code_dir(digest)
            manifest = load_manifest(code_dir, self.settings.max_manifest_bytes, inv.plugin)
        except (BundleError, ManifestError) as exc:
            return self.fail(inv, Status.FAILED, f"plugin content unusable: {exc.message}")
        try:
            allowed_path = check_payload_path(inv.event.payload, manifest.allowed_globs)
        except PermissionDenied as exc:
            return self.fail(inv, Status.REJECTED, exc.message)
        try:
            deps = self.cache.deps_dir(code_dir)
        except DependencyError as exc:
            return self.fail(inv, Status.FAILED, exc.message)
        event_json = inv.event.encode()
        event_file = self._write_event_file(inv.invocation_id, event_json)
        try:
            spec = RunSpec(
                invocation_id=inv.invocation_id, plugin=inv.plugin, version=inv.version,
                image=manifest.image, argv=manifest.argv, code_dir=str(code_dir),
                event_json=event_json, event_file=str(event_file),
                timeout=min(manifest.timeout, self.settings.max_timeout),
                memory_bytes=manifest.memory_bytes, cpu_millis=manifest.cpu_millis,
                deps_dir=str(deps) if deps else None,
                read_only_dirs=self._mounts(allowed_path, manifest.allowed_globs))
            result = self.sandbox.run(spec)
        finally:
            event_file.unlink(missing_ok=True)
        metrics.CONTAINER_START.observe(result.container_start_s)
        metrics.DURATION.labels(plugin=inv.plugin).observe(result.duration_s)
        record = self.publisher.finish(inv, result)
        metrics.INVOCATIONS.labels(plugin=inv.plugin, status=record["status"]).inc()
        return record

    @staticmethod
    def _mounts(allowed_path: str | None, globs: tuple[str, ...]) -> tuple[str, ...]:
        """An event naming a path gets exactly that (checked) path; otherwise the plugin
        sees the directories its globs name. A missing path mounts nothing (ENOENT)."""
        if allowed_path is not None:
            return (allowed_path,) if os.path.exists(allowed_path) else ()
        return tuple(mount_sources(globs))

    def fail(self, inv: Invocation, status: Status, reason: str) -> dict[str, Any]:
        """A terminal outcome decided without a container run (rejected, retries spent)."""
        metrics.INVOCATIONS.labels(plugin=inv.plugin, status=status.value).inc()
        return self.publisher.complete(inv, status, reason)

    def _write_event_file(self, invocation_id: str, event_json: str) -> Path:
        directory = self.settings.cache_dir / "events"
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{invocation_id}-", suffix=".json", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(event_json)
        os.chmod(name, 0o644)
        return Path(name)


def invocation_from_task(kwargs: dict[str, Any]) -> Invocation:
    return Invocation(kwargs["invocation_id"], kwargs["plugin"], kwargs["version"],
                      Event.from_dict(kwargs["event"]))
