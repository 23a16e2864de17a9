"""Prepare: what a run needs on the host before any container, the same for a worker and
for `titan-plugins run`: its code (the bundle, unpacked by digest), its payload file
opened with a run's rights (or the allowed directories it may mount), its requirements
installed, and the container configuration they make (the run's RunSpec). A run that
cannot be prepared ends here with an Outcome: rejected (its content is unusable, or a path
it names is not its to read) or failed (its requirements do not install)."""

from __future__ import annotations

from dataclasses import dataclass

from manager.core.config import Settings
from manager.core.errors import BundleError, DependencyError, PermissionDenied
from manager.core.groups import FsSettings, RuntimeSettings
from manager.core.records import Outcome, Status
from manager.core.runs import Isolation, RunRequest
from manager.plugins.permissions import (
    PayloadFile,
    mount_sources,
    open_payload_path,
    payload_dirs,
)
from workers.engine import Engine
from workers.plugin_cache import PluginCache
from workers.run_spec import PoolConfig, RunSpec


@dataclass
class Prepared:
    """A run ready for its container: its spec, and its payload file when it names one
    (an open descriptor of exactly the object checked: `close` it)."""

    spec: RunSpec
    payload: PayloadFile | None = None

    def close(self) -> None:
        if self.payload is not None:
            self.payload.close()


def prepare(req: RunRequest, settings: Settings, engine: Engine, cache: PluginCache,
            bundle: bytes | None = None) -> Prepared | Outcome:
    """The run's code, host paths and requirements, or the Outcome that ends it here.
    Raises SandboxUnavailable when the engine cannot be asked (its data root)."""
    try:
        code_dir = cache.code_dir(req.digest, bundle)
    except BundleError as exc:
        return Outcome(Status.REJECTED, f"plugin content unusable: {exc.message}")
    try:
        payload, mounts = host_paths(req, settings.fs, engine)
    except PermissionDenied as exc:
        return Outcome(Status.REJECTED, exc.message)
    try:
        deps = cache.deps_dir(code_dir)
    except (DependencyError, BundleError) as exc:
        if payload is not None:
            payload.close()
        return Outcome(Status.FAILED, exc.message)
    config = PoolConfig(req.plugin, req.version, req.digest, req.image, req.argv,
                        str(code_dir), req.limits.clamped(settings.limits),
                        str(deps) if deps else None, mounts, runtime(req, settings.runtime),
                        payload_dirs(req.allowed_globs, settings.fs) if payload else (),
                        settings.egress_network if req.net_allow else None,
                        bool(req.secrets))
    return Prepared(RunSpec(config, req.invocation_id, req.event.encode()), payload)


def runtime(req: RunRequest, runtimes: RuntimeSettings) -> str | None:
    """The engine's runtime: gVisor's (with its own network stack when the run has an
    egress grant: the plain one is registered with --network=none), or the default."""
    if req.isolation is not Isolation.GVISOR:
        return None
    return runtimes.gvisor_net if req.net_allow else runtimes.gvisor


def host_paths(req: RunRequest, fs: FsSettings,
               engine: Engine) -> tuple[PayloadFile | None, tuple[str, ...]]:
    """The payload file, or the allowed directories, as a run's identity may open them:
    one taken for the checks (its verdict is any run's: every run has the same group, and
    no host file belongs to a run's uid)."""
    if "path" not in req.event.payload and not req.allowed_globs:
        return None, ()
    forbidden = [engine.docker_root]
    judge = engine.identities.take()
    try:
        payload = open_payload_path(req.event.payload, req.allowed_globs, fs, judge,
                                    forbidden)
        if payload:
            return payload, ()
        return None, tuple(mount_sources(req.allowed_globs, fs, judge, forbidden))
    finally:
        engine.identities.give_back(judge)
