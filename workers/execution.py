"""One run request through the host-side checks and one sandboxed container, without
Redis: what a worker does between claiming a run and storing its outcome, shared with
`titan-plugins run` (an author's local run) so both follow exactly the same rules."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from manager.core import metrics
from manager.core.config import Settings
from manager.core.errors import BundleError, DependencyError, PermissionDenied
from manager.core.records import Status
from manager.core.runs import Isolation, RunRequest
from manager.plugins.deps import mkdirs
from manager.plugins.permissions import PayloadFile, mount_sources, open_payload_path
from workers.execute import write_event
from workers.identity import account_files
from workers.plugin_cache import PluginCache
from workers.pool import WarmPool
from workers.sandbox import Sandbox
from workers.spec import PoolConfig, RunResult, RunSpec
from workers.warm import WarmBroken, run_warm


@dataclass(frozen=True)
class Refused:
    """A run that ended before any container: rejected (permissions) or unusable."""

    status: Status
    reason: str


class Execution:
    def __init__(self, settings: Settings, sandbox: Sandbox, cache: PluginCache,
                 pool: WarmPool | None = None) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.cache = cache
        self.pool = pool

    def run(self, req: RunRequest, code_dir: Path) -> RunResult | Refused:
        """Checks the payload path and the allowed directories, installs requirements,
        and runs one container. Raises SandboxUnavailable when the engine is unusable."""
        try:
            payload, mounts = self.host_paths(req)
        except PermissionDenied as exc:
            return Refused(Status.REJECTED, exc.message)
        try:
            deps = self.cache.deps_dir(code_dir)
            return self.container(req, code_dir, deps, payload, mounts)
        except (DependencyError, BundleError) as exc:
            return Refused(Status.FAILED, exc.message)
        finally:
            if payload:
                payload.close()

    def host_paths(self, req: RunRequest) -> tuple[PayloadFile | None, tuple[str, ...]]:
        """The payload file, or the allowed directories, as a run's identity may open them:
        one taken for the checks (its verdict is any run's: every run has the same group,
        and no host file belongs to a run's uid)."""
        if "path" not in req.event.payload and not req.allowed_globs:
            return None, ()
        forbidden = [self.sandbox.docker_root]
        judge = self.sandbox.identities.take()
        try:
            payload = open_payload_path(req.event.payload, req.allowed_globs, self.settings,
                                        judge, forbidden)
            if payload:
                return payload, ()
            return None, tuple(mount_sources(req.allowed_globs, self.settings, judge,
                                             forbidden))
        finally:
            self.sandbox.identities.give_back(judge)

    def container(self, req: RunRequest, code_dir: Path, deps: Path | None,
                  payload: PayloadFile | None, mounts: tuple[str, ...]) -> RunResult:
        """A prewarmed container when one is ready for this configuration (never for a
        run whose mounts depend on its event), else a cold one."""
        t0 = time.monotonic()
        config = PoolConfig(req.plugin, req.version, req.digest, req.image, req.argv,
                            str(code_dir), req.limits.clamped(self.settings),
                            str(deps) if deps else None, mounts,
                            self.settings.gvisor_runtime
                            if req.isolation is Isolation.GVISOR else None)
        spec = RunSpec(config, req.invocation_id, req.event.encode())
        warm = self.pool.take(spec) if self.pool and req.prewarm and not payload else None
        result = None
        if warm is not None:
            try:
                result = run_warm(self.sandbox, warm, spec)
            except WarmBroken:
                result = None  # it never started the plugin: a cold container instead
            finally:
                self.pool.done(warm)  # type: ignore[union-attr]
        if result is None:
            result = self.cold(spec, payload)
        metrics.CONTAINER_READY.observe(time.monotonic() - t0 - result.duration_s
                                        + result.container_start_s)
        return result

    def cold(self, spec: RunSpec, payload: PayloadFile | None) -> RunResult:
        """One fresh container, as a uid of its own, in a private per-run directory (event
        file and payload copy, readable by that uid alone), removed afterwards whatever
        happened; the uid is given back once the container is gone."""
        run_dir = mkdirs(self.cache.root / "runs", 0o700) / f"{spec.invocation_id}-{os.getpid()}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=0o700)
        user = self.sandbox.identities.take()
        handed = False  # from then on the sandbox gives it back, with its container
        try:
            event_file = write_event(run_dir, spec, user)
            staged = payload.stage(run_dir, user) if payload else None
            accounts = account_files(run_dir, user)
            handed = True
            return self.sandbox.run(replace(
                spec, event_file=str(event_file), user=user, accounts=accounts,
                payload=(staged, payload.path) if staged and payload else None))
        finally:
            if not handed:
                self.sandbox.identities.give_back(user)
            shutil.rmtree(run_dir, ignore_errors=True)
