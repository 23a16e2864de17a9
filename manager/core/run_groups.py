"""Settings of a plugin's way from its directory to its container, by the part that needs
them (as manager.core.groups): how a plugin is checked and what its runs are decided
under PluginSettings (manager.plugins.loader, manager.plugins.discovery); what a run may
write back OutputSettings (workers.run_loop, workers.attempt, workers.classify); the
runs' uids IdentitySettings (workers.identity); the code and requirements cache
CacheSettings (workers.plugin_cache, manager.plugins.janitor); the engine and its
launches EngineSettings (workers.engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager.core.events import Limits
from manager.core.groups import (
    FsSettings,
    InstallSettings,
    LimitSettings,
    PrewarmSettings,
    RuntimeSettings,
    SandboxSettings,
)
from manager.core.paths import RUN_DIR


@dataclass(frozen=True)
class OutputSettings:
    """What a run may write back: each stream capped (the first byte over kills the
    container), at most `max_results` result events, each within the event limits."""

    cap_bytes: int = 1024 * 1024
    max_results: int = 100
    event_limits: Limits = field(default_factory=Limits)

    @classmethod
    def of(cls, s: Any) -> OutputSettings:
        return cls(s.output_cap_bytes, s.max_results, s.event_limits)


@dataclass(frozen=True)
class IdentitySettings:
    """The host uids runs are given, one per live container (TITAN_RUN_IDS), leased
    through files in `uid_dir` (host-wide); a lease outlives any run's timeout."""

    run_ids: str = "2000000-2099999"
    uid_dir: Path = Path("/run/titan/uids")
    max_timeout: int = 600

    @classmethod
    def of(cls, s: Any) -> IdentitySettings:
        return cls(s.run_ids, Path(s.uid_dir), s.max_timeout)


@dataclass(frozen=True)
class CacheSettings:
    """A host's cache of plugin code and installed requirements: where it is, how large
    it may grow, how large one plugin's bundle may be, how its requirements install,
    and how long an entry may be in use (a run's timeout, a prewarmed container's wait)."""

    dir: Path = RUN_DIR / "cache"
    max_bytes: int = 4 * 1024**3
    max_bundle_bytes: int = 32 * 1024**2
    install: InstallSettings = field(default_factory=InstallSettings)
    held_s: int = 600 + 300  # the longest run and the longest idle prewarmed container

    @classmethod
    def of(cls, s: Any) -> CacheSettings:
        return cls(s.cache_dir, s.cache_max_bytes, s.max_bundle_bytes, InstallSettings.of(s),
                   s.max_timeout + s.prewarm_idle_s)


@dataclass(frozen=True)
class EngineSettings:
    """A worker's engine and its two launches (workers.cold, workers.warm): whose
    containers these are (the instance, the worker), the image no pull may replace, every
    container's bounds, the pool's, where runs' files and secret files go, the runs' uids."""

    instance: str = "default"
    worker_name: str = ""
    runtime_image: str = "titan-runtime:py3.11"
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    prewarm: PrewarmSettings = field(default_factory=PrewarmSettings)
    cache_dir: Path = RUN_DIR / "cache"
    secret_files_dir: Path = Path("/run/titan/secrets")
    identity: IdentitySettings = field(default_factory=IdentitySettings)

    @classmethod
    def of(cls, s: Any) -> EngineSettings:
        return cls(s.instance, s.worker_name, s.runtime_image, SandboxSettings.of(s),
                   PrewarmSettings.of(s), s.cache_dir, s.secret_files_dir,
                   IdentitySettings.of(s))


@dataclass(frozen=True)
class PluginSettings:
    """What a plugin directory is checked against when it loads (its size, its manifest,
    the operator's ceilings, the hosts and files it may be granted, how its requirements
    install), and what its runs are decided under (the ceilings, gVisor for all)."""

    limits: LimitSettings = field(default_factory=LimitSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    fs: FsSettings = field(default_factory=FsSettings)
    install: InstallSettings = field(default_factory=InstallSettings)
    egress_allow: tuple[str, ...] = ()
    max_bundle_bytes: int = 32 * 1024**2
    max_plugin_files: int = 2000
    max_manifest_bytes: int = 64 * 1024
    settle_ms: int = 300  # a reload reads a changed directory again after this

    @classmethod
    def of(cls, s: Any) -> PluginSettings:
        return cls(LimitSettings.of(s), RuntimeSettings.of(s), FsSettings.of(s),
                   InstallSettings.of(s), tuple(s.egress_allow), s.max_bundle_bytes,
                   s.max_plugin_files, s.max_manifest_bytes, s.reload_settle_ms)
