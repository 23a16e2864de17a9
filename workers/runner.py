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
from manager.errors import (
    BundleError,
    DependencyError,
    ManifestError,
    PermissionDenied,
    RetryRun,
    Throttled,
)
from manager.events import Event
from manager.keys import Keys
from manager.manifest import Manifest, load_manifest
from manager.permissions import check_payload_path, mount_sources
from manager.records import RecordStore, Status
from manager.registry import Registry
from workers.plugin_cache import PluginCache
from workers.results import Invocation, Publisher
from workers.sandbox import RunSpec, Sandbox
from workers.slots import Slots

log = logging.getLogger(__name__)
RETRYABLE = {Status.FAILED, Status.TIMEOUT, Status.OOM}  # only with `retries:` in the manifest


class Runner:
    """Per worker process: owns the Sandbox (one Docker client) and the host's caches."""

    def __init__(self, conn: redis.Redis, settings: Settings, sandbox: Sandbox) -> None:
        self.conn = conn
        self.settings = settings
        self.sandbox = sandbox
        self.records = RecordStore(conn, settings)
        self.publisher = Publisher(conn, settings)
        self.cache = PluginCache(Registry(conn, settings), settings)
        self.slots = Slots(conn, Keys(settings.key_prefix))
        self._manifests: dict[tuple[str, str], Manifest] = {}

    def start(self, invocation_id: str, worker: str | None = None) -> dict[str, Any] | None:
        """Marks the record running and counts the attempt (redeliveries included); None
        when the invocation already finished (a duplicate delivery)."""
        record = self.records.get(invocation_id) or {}
        if record.get("status") and Status(record["status"]).terminal:
            log.info("invocation %s already %s; skipping", invocation_id, record["status"])
            return None
        return self.records.update(invocation_id, status=Status.RUNNING.value,
                                   attempts=int(record.get("attempts") or 0) + 1,
                                   worker=worker or self.settings.worker_name,
                                   worker_pid=os.getpid(), started_at=time.time())

    def run(self, inv: Invocation, digest: str, attempt: int = 1) -> dict[str, Any]:
        """Runs the exact content `digest`. Raises SandboxUnavailable (engine unusable),
        Throttled (no concurrency slot) or RetryRun (the manifest asks for a re-run)."""
        try:
            code_dir = self.cache.code_dir(digest)
            manifest = self._manifest(code_dir, digest, inv.plugin)
        except (BundleError, ManifestError) as exc:
            return self.fail(inv, Status.FAILED, f"plugin content unusable: {exc.message}")
        if manifest.concurrency is None:
            return self._run(inv, manifest, code_dir, attempt)
        lease = manifest.timeout + 120
        if not self.slots.acquire(inv.plugin, inv.invocation_id, manifest.concurrency, lease):
            raise Throttled(f"{inv.plugin} already runs {manifest.concurrency} time(s)")
        try:
            return self._run(inv, manifest, code_dir, attempt)
        finally:
            self.slots.release(inv.plugin, inv.invocation_id)

    def _run(self, inv: Invocation, manifest: Manifest, code_dir: Path,
             attempt: int) -> dict[str, Any]:
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
        if result.status in RETRYABLE and attempt <= manifest.retries:
            self.records.update(inv.invocation_id, status=Status.RETRYING.value,
                                reason=f"{result.status.value}: {result.reason}",
                                exit_code=result.exit_code)
            raise RetryRun(f"attempt {attempt} {result.status.value}; "
                           f"{manifest.retries - attempt + 1} retry(ies) left")
        record = self.publisher.finish(inv, result)
        metrics.INVOCATIONS.labels(plugin=inv.plugin, status=record["status"]).inc()
        return record

    def _manifest(self, code_dir: Path, digest: str, plugin: str) -> Manifest:
        """Parsed once per digest: the content behind a digest never changes."""
        key = (digest, plugin)
        if key not in self._manifests:
            self._manifests[key] = load_manifest(code_dir, self.settings.max_manifest_bytes,
                                                 plugin)
        return self._manifests[key]

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
