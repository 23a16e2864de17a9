"""Every setting, read from the environment in one place, once per process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from manager.core.events import Limits

ROOT = Path(__file__).resolve().parents[2]


def _number(name: str, default: Any, kind: type) -> Any:
    """An int or float variable; empty means the default; anything else names the problem."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {raw!r}") from exc


def _str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in raw.replace(",", ":").split(":") if p.strip())


@dataclass(frozen=True)
class Settings:
    """Typed settings; `Settings.from_env()` is the only reader of TITAN_* variables."""

    redis_url: str = "redis://127.0.0.1:6379/0"  # with Sentinel: its password and db only
    # Redis behind Sentinel: "host:port,host:port,...", and the primary's name there.
    redis_sentinels: str = ""
    redis_master: str = "titan"
    # Acknowledged means replicated: a published event and a run's outcome count as stored
    # only once this many replicas confirm them (WAIT), within redis_wait_ms.
    redis_min_replicas: int = 0
    redis_wait_ms: int = 2000
    event_stream: str = "titan:events"
    dead_stream: str = "titan:events:dead"
    consumer_group: str = "titan-plugin-manager"
    key_prefix: str = "titan"
    plugins_dir: Path = ROOT / "plugins"
    run_dir: Path = ROOT / "run"
    cache_dir: Path = ROOT / "run" / "cache"
    runtime_image: str = "titan-runtime:py3.11"
    runtime_python: str = "3.11"
    instance: str = "default"
    api_host: str = "127.0.0.1"
    api_port: int = 8003
    # The CLI's channel: a socket only root can open (in the root-only run directory).
    api_socket: Path = ROOT / "run" / "api.sock"
    api_token: str = ""
    # One client must not hold the API: requests run on api_threads threads, of which at
    # most api_waiters wait for a run (`?wait`); idle or slow connections are dropped after
    # api_channel_timeout seconds; at most api_connection_limit connections are open.
    api_threads: int = 8
    api_waiters: int = 4
    api_channel_timeout: int = 10
    api_connection_limit: int = 1000
    metrics_port: int = 8004
    task_queue: str = "titan.plugins"
    # The host ids of runs (workers.identity): the first is the group every run shares, the
    # others are uids, one per live container; held through files in uid_dir (host-wide).
    run_ids: str = "2000000-2099999"
    uid_dir: str = "/run/titan/uids"
    host_etc: str = "/"  # where the host's /etc is seen from (compose workers: a mount)
    # Host roots that plugins may be granted (SPEC §4); system and project paths never are.
    allowed_roots: tuple[Path, ...] = (Path("/srv/titan"),)
    # The one package index requirements.txt is installed from (wheels only).
    pip_index_url: str = "https://pypi.org/simple"
    pip_find_links: str = ""  # a local directory of wheels used instead of any index
    # pip runs as this uid (no account needed; never 0), in this sandbox: bwrap, or user
    # (no namespaces: inside a service container that is itself the boundary).
    install_uid: int = 64999
    install_sandbox: str = "bwrap"
    # Each host's cache (plugin code, installed requirements) is kept under this size by
    # evicting what was used least recently.
    cache_max_bytes: int = 4 * 1024**3
    # Event limits (SPEC §2).
    max_event_bytes: int = 1024 * 1024
    max_event_depth: int = 64
    max_hops: int = 8
    fanout_budget: int = 100  # runs per correlation_id
    fanout_ttl: int = 24 * 3600
    # Operator maxima and sandbox settings (SPEC §4).
    max_timeout: int = 600
    max_memory_bytes: int = 2 * 1024**3
    max_cpu_millis: int = 2000
    output_cap_bytes: int = 1024 * 1024
    tmpfs_bytes: int = 64 * 1024**2  # at most half the plugin's memory (tmpfs is memory)
    tmpfs_inodes: int = 4096
    shm_bytes: int = 8 * 1024**2  # /dev/shm, a second capped tmpfs
    pids_limit: int = 64
    nofile_limit: int = 256
    fsize_bytes: int = 32 * 1024**2  # below the tmpfs size, so one file cannot fill /tmp
    max_results: int = 100
    # A payload file is copied for its run: refused by its size (sparse or not) above this.
    max_payload_bytes: int = 128 * 1024**2
    max_manifest_bytes: int = 64 * 1024
    max_bundle_bytes: int = 32 * 1024**2
    max_plugin_files: int = 2000
    # A reload takes a plugin directory once two reads this far apart agree and no file
    # changed in the interval before the first (an editor's or rsync's half-written file).
    reload_settle_ms: int = 300
    # Prewarmed single-use containers, per worker process (0 turns them off).
    prewarm_size: int = 1  # ready containers per plugin configuration
    prewarm_max: int = 4  # ready containers in all
    prewarm_idle_s: int = 300  # a ready container unused this long is removed
    # Retention.
    record_ttl: int = 7 * 24 * 3600
    stream_maxlen: int = 100_000
    stream_max_age: int = 7 * 24 * 3600  # seconds; older stream entries are trimmed
    dedup_ttl: int = 24 * 3600
    # Delivery: unacknowledged tasks come back after visibility_timeout (0: max_timeout + 300).
    visibility_timeout: int = 0
    restore_interval: int = 60  # how often workers look for tasks whose worker died
    sandbox_retries: int = 5
    retry_backoff_max: int = 60
    throttle_backoff_max: int = 30
    # Fairness: while other plugins wait, one plugin holds at most this part of the worker
    # slots the live workers report (at least one slot).
    plugin_share: float = 0.5
    # Isolation: "container" lets each manifest choose (`isolation:`); "gvisor" runs every
    # plugin under gVisor. The engine must have the runtime registered under this name.
    isolation: str = "container"
    gvisor_runtime: str = "runsc"
    finish_budget_s: int = 3600  # how long a finished run waits for Redis to come back
    sweep_interval_s: int = 30  # how often the manager looks for abandoned runs
    sweep_grace_s: int = 30  # a run must look abandoned this long before it is swept
    max_requeues: int = 3  # sweeper re-queues per run before it is marked lost
    # Listener.
    reclaim_idle_ms: int = 60_000
    max_deliveries: int = 5  # a stream entry that fails this often is dead-lettered
    housekeeping_s: int = 15  # how often the manager reclaims, trims and sweeps
    read_block_ms: int = 1000
    worker_name: str = field(default_factory=socket.gethostname)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Builds settings from TITAN_* variables; keyword overrides win (tests use them)."""
        run_dir = Path(_str("TITAN_RUN_DIR", str(ROOT / "run")))
        values: dict[str, Any] = {
            "plugins_dir": Path(_str("TITAN_PLUGINS_DIR", str(ROOT / "plugins"))),
            "run_dir": run_dir,
            "api_socket": Path(_str("TITAN_API_SOCKET", str(run_dir / "api.sock"))),
            # {hostname}: one cache per worker container sharing a host directory (compose)
            "cache_dir": Path(_str("TITAN_CACHE_DIR", str(run_dir / "cache")).replace(
                "{hostname}", socket.gethostname())),
            "allowed_roots": _paths(_str("TITAN_ALLOWED_ROOTS", "/srv/titan")),
            "worker_name": _str("TITAN_WORKER_NAME", socket.gethostname()),
        }
        for f in fields(cls):
            env = "TITAN_" + f.name.upper()
            if f.name in values:
                continue
            if f.type in ("int", int, "float", float):
                kind = int if f.type in ("int", int) else float
                values[f.name] = _number(env, f.default, kind)
            elif f.type in ("str", str):
                values[f.name] = _str(env, f.default)  # type: ignore[arg-type]
        values.update(overrides)
        settings = cls(**values)
        if settings.isolation not in ("container", "gvisor"):
            raise ValueError("TITAN_ISOLATION must be container or gvisor, got "
                             f"{settings.isolation!r}")
        if not 0 < settings.plugin_share <= 1:
            raise ValueError("TITAN_PLUGIN_SHARE must be above 0 and at most 1, got "
                             f"{settings.plugin_share}")
        return settings

    @property
    def event_limits(self) -> Limits:
        """The event limits every reader applies (listener, API, a worker's results)."""
        return Limits(self.max_event_bytes, self.max_event_depth)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels to ask for the primary (empty: Redis is redis_url itself)."""
        found = []
        for item in self.redis_sentinels.replace(";", ",").split(","):
            host, _, port = item.strip().rpartition(":")
            if item.strip():
                found.append((host or "127.0.0.1", int(port)))
        return found

    @property
    def effective_visibility_timeout(self) -> int:
        return self.visibility_timeout or self.max_timeout + 300

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


_current: Settings | None = None


def current() -> Settings:
    """This process's settings: read from the environment once, on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current
