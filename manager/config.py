"""Every setting, read from the environment in one place."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _str(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Settings:
    """Typed settings; `Settings.from_env()` is the only reader of TITAN_* variables."""

    redis_url: str = "redis://127.0.0.1:6379/0"
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
    api_token: str = ""
    metrics_port: int = 8004
    task_queue: str = "titan.plugins"
    # Event limits (SPEC §2).
    max_event_bytes: int = 1024 * 1024
    max_event_depth: int = 64
    max_hops: int = 8
    # Operator maxima and sandbox defaults (SPEC §4).
    default_timeout: int = 30
    max_timeout: int = 600
    max_memory_bytes: int = 2 * 1024**3
    max_cpu_millis: int = 2000
    default_memory_bytes: int = 256 * 1024**2
    default_cpu_millis: int = 500
    output_cap_bytes: int = 1024 * 1024
    tmpfs_bytes: int = 64 * 1024**2  # at most half the plugin's memory (tmpfs is memory)
    tmpfs_inodes: int = 4096
    pids_limit: int = 64
    nofile_limit: int = 256
    fsize_bytes: int = 32 * 1024**2  # below the tmpfs size, so one file cannot fill /tmp
    max_results: int = 1000
    max_manifest_bytes: int = 64 * 1024
    max_bundle_bytes: int = 32 * 1024**2
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
    # Listener.
    reclaim_idle_ms: int = 60_000
    housekeeping_s: int = 15  # how often the listener reclaims and trims
    read_block_ms: int = 1000
    worker_name: str = field(default_factory=socket.gethostname)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Builds settings from TITAN_* variables; keyword overrides win (tests use them)."""
        run_dir = Path(_str("TITAN_RUN_DIR", str(ROOT / "run")))
        values: dict[str, Any] = {
            "redis_url": _str("TITAN_REDIS_URL", cls.redis_url),
            "event_stream": _str("TITAN_EVENT_STREAM", cls.event_stream),
            "dead_stream": _str("TITAN_DEAD_STREAM", cls.dead_stream),
            "consumer_group": _str("TITAN_CONSUMER_GROUP", cls.consumer_group),
            "key_prefix": _str("TITAN_KEY_PREFIX", cls.key_prefix),
            "plugins_dir": Path(_str("TITAN_PLUGINS_DIR", str(ROOT / "plugins"))),
            "run_dir": run_dir,
            "cache_dir": Path(_str("TITAN_CACHE_DIR", str(run_dir / "cache"))),
            "runtime_image": _str("TITAN_RUNTIME_IMAGE", cls.runtime_image),
            "runtime_python": _str("TITAN_RUNTIME_PYTHON", cls.runtime_python),
            "instance": _str("TITAN_INSTANCE", cls.instance),
            "api_host": _str("TITAN_API_HOST", cls.api_host),
            "api_port": _int("TITAN_API_PORT", cls.api_port),
            "api_token": _str("TITAN_API_TOKEN", ""),
            "metrics_port": _int("TITAN_METRICS_PORT", cls.metrics_port),
            "task_queue": _str("TITAN_TASK_QUEUE", cls.task_queue),
            "worker_name": _str("TITAN_WORKER_NAME", socket.gethostname()),
        }
        for f in fields(cls):
            env = "TITAN_" + f.name.upper()
            if f.type in ("int", int) and f.name not in values:
                values[f.name] = _int(env, f.default)  # type: ignore[arg-type]
        values.update(overrides)
        return cls(**values)

    @property
    def effective_visibility_timeout(self) -> int:
        return self.visibility_timeout or self.max_timeout + 300

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
