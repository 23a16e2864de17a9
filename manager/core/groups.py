"""Settings by the part that needs them. A group is a frozen view of the flat Settings
(every TITAN_* variable keeps its documented name; `Settings.redis` builds it when
asked, so a changed copy, `with_`, never hands out a stale one), handed to a part instead
of all of them: a part's signature says what it reads, and a test can build just that.
The Redis clients take RedisSettings (manager.core.clients, manager.core.contract);
the egress proxy and its grants EgressSettings (manager.egress); the API's front
ApiSettings (manager.api.front); the timers TimerSettings (manager.bus.timers); the
warm pool PrewarmSettings (workers.pool, workers.warm); a container's fixed bounds
SandboxSettings (workers.options); a run's clamp LimitSettings (manager.core.runs); the
host paths a plugin may be granted FsSettings (manager.plugins.permissions); pip's
InstallSettings (manager.plugins.deps, manager.plugins.installer); Celery's
BrokerSettings (manager.core.contract); the containers' image and runtimes
RuntimeSettings (manager.plugins.engines, manager.plugins.loader, workers.prepare);
the records' lives RecordSettings (manager.core.record_store); the bus's stream
StreamSettings (manager.api.context, manager.bus.listener). A run's
path on a worker host has its own (manager.core.run_groups)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager.core.keys import Keys
from manager.core.paths import RUN_DIR


def sentinels_of(text: str) -> tuple[tuple[str, int], ...]:
    """"host:port,host:port" (or ;-separated) -> the Sentinels to ask for the primary."""
    found = []
    for item in text.replace(";", ",").split(","):
        host, _, port = item.strip().rpartition(":")
        if item.strip():
            found.append((host or "127.0.0.1", int(port)))
    return tuple(found)


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis and when a write counts as stored (TITAN_REDIS_*)."""

    url: str = "redis://127.0.0.1:6379/0"  # with Sentinel: its password and db only
    sentinels: tuple[tuple[str, int], ...] = ()  # empty: Redis is `url` itself
    master: str = "titan"  # the primary's name at the Sentinels
    min_replicas: int = 0  # a write counts once this many replicas confirm it (WAIT)
    wait_ms: int = 2000
    tls_ca: str = ""  # rediss://: the CA the server's certificate must chain to
    tls_cert: str = ""  # this process's client certificate and key
    tls_key: str = ""
    read_block_ms: int = 1000  # the longest blocking read (a socket waits longer)

    @classmethod
    def of(cls, s: Any) -> RedisSettings:
        """From the flat Settings (typed Any: manager.core.config imports this module)."""
        return cls(s.redis_url, sentinels_of(s.redis_sentinels), s.redis_master,
                   s.redis_min_replicas, s.redis_wait_ms, s.redis_tls_ca, s.redis_tls_cert,
                   s.redis_tls_key, s.read_block_ms)


@dataclass(frozen=True)
class EgressSettings:
    """The egress proxy of one instance and the ceiling of its grants (TITAN_EGRESS_*;
    `{instance}` already filled in)."""

    instance: str = "default"
    allow: tuple[str, ...] = ()  # host:port patterns no grant may exceed (empty: no network)
    hosts: str = ""  # a hosts(5) file the proxy reads before DNS
    dir: Path = Path("/run/titan/egress/default")  # its state: conf, grants, logs
    network: str = "titan-egress-default"
    bridge: str = ""
    port: int = 3128
    user: str = "titan-proxy"
    max_connections: int = 64  # per run
    max_bytes: int = 64 * 1024**2  # per run
    max_timeout: int = 600  # the longest run: a connection never outlives it

    @classmethod
    def of(cls, s: Any) -> EgressSettings:
        return cls(s.instance, s.egress_allow, s.egress_hosts, s.egress_dir, s.egress_network,
                   s.egress_bridge, s.egress_port, s.egress_user, s.egress_max_connections,
                   s.egress_max_bytes, s.max_timeout)


@dataclass(frozen=True)
class ApiSettings:
    """Where and how the API (and the ports behind the same front) is served
    (TITAN_API_*, TITAN_METRICS_PORT); paths under the run directory already resolved."""

    host: str = "127.0.0.1"
    port: int = 8003
    socket: Path = RUN_DIR / "api.sock"  # the CLI's channel, root's alone
    token: str = ""
    tls: bool = False
    tls_cert: Path = RUN_DIR / "tls/servers/api.crt"
    tls_key: Path = RUN_DIR / "tls/servers/api.key"
    threads: int = 8  # requests run on these; at most `waiters` wait for a run
    waiters: int = 4
    channel_timeout: int = 10
    connection_limit: int = 1000
    header_timeout_s: int = 10  # the front's deadlines and its cap per local account
    body_timeout_s: int = 30
    peer_connections: int = 32
    metrics_port: int = 8004

    @classmethod
    def of(cls, s: Any) -> ApiSettings:
        return cls(s.api_host, s.api_port, s.api_socket, s.api_token, s.api_tls, s.api_tls_cert,
                   s.api_tls_key, s.api_threads, s.api_waiters, s.api_channel_timeout,
                   s.api_connection_limit, s.api_header_timeout_s, s.api_body_timeout_s,
                   s.api_peer_connections, s.metrics_port)


@dataclass(frozen=True)
class TimerSettings:
    """How the manager's clock passes and where its ticks go (TITAN_TIMER_*)."""

    pass_s: float = 0.2  # the longest wait between passes (a due tick shortens it)
    grace_s: float = 2.0  # a tick fired later than this after its time is `late`
    stream: str = "titan:events"
    stream_maxlen: int = 100_000

    @classmethod
    def of(cls, s: Any) -> TimerSettings:
        return cls(s.timer_pass_s, s.timer_grace_s, s.event_stream, s.stream_maxlen)


@dataclass(frozen=True)
class PrewarmSettings:
    """How many ready containers a worker process keeps, for how long, and whether their
    interpreter is started ahead (TITAN_PREWARM_*, TITAN_WARM_INTERPRETER)."""

    size: int = 1  # ready containers per plugin configuration
    max: int = 4  # ready containers in all
    idle_s: int = 300  # a ready container unused this long is removed
    interpreter: bool = True

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.max > 0

    @classmethod
    def of(cls, s: Any) -> PrewarmSettings:
        return cls(s.prewarm_size, s.prewarm_max, s.prewarm_idle_s, s.warm_interpreter)


@dataclass(frozen=True)
class LimitSettings:
    """The most any run may have, whatever its plugin asks: a manifest above it is
    refused at load, a run's limits are clamped to it (TITAN_MAX_*, TITAN_PIDS_LIMIT)."""

    timeout: int = 600
    memory_bytes: int = 2 * 1024**3
    cpu_millis: int = 2000
    pids: int = 64

    @classmethod
    def of(cls, s: Any) -> LimitSettings:
        return cls(s.max_timeout, s.max_memory_bytes, s.max_cpu_millis, s.pids_limit)


@dataclass(frozen=True)
class SandboxSettings:
    """The bounds every run's container has whatever its plugin asks (a plugin's own
    memory, CPU and pids are its limits, clamped: manager.core.runs.RunLimits)."""

    tmpfs_bytes: int = 64 * 1024**2  # /tmp, at most half the plugin's memory
    tmpfs_inodes: int = 4096
    shm_bytes: int = 8 * 1024**2  # /dev/shm, at most an eighth of it
    nofile: int = 256
    fsize_bytes: int = 32 * 1024**2
    cache_dir: Path = RUN_DIR / "cache"  # root's alone: the files containers mount

    @classmethod
    def of(cls, s: Any) -> SandboxSettings:
        return cls(s.tmpfs_bytes, s.tmpfs_inodes, s.shm_bytes, s.nofile_limit, s.fsize_bytes,
                   s.cache_dir)


@dataclass(frozen=True)
class FsSettings:
    """The host's files a plugin may be granted: under the operator's roots, never the
    project's own directories, a payload file at most `max_payload_bytes`."""

    allowed_roots: tuple[Path, ...] = (Path("/srv/titan"),)
    max_payload_bytes: int = 128 * 1024**2
    run_dir: Path = RUN_DIR
    cache_dir: Path = RUN_DIR / "cache"
    plugins_dir: Path = Path("plugins")

    @classmethod
    def of(cls, s: Any) -> FsSettings:
        return cls(tuple(s.allowed_roots), s.max_payload_bytes, s.run_dir, s.cache_dir,
                   s.plugins_dir)


@dataclass(frozen=True)
class InstallSettings:
    """How a plugin's requirements are installed: pip against the operator's index (or
    its directory of wheels), for the runtime image's Python, as `install_uid` inside
    `install_sandbox` (bwrap, or a plain user), into the cache."""

    pip_index_url: str = "https://pypi.org/simple"
    pip_find_links: str = ""
    runtime_python: str = "3.11"
    install_uid: int = 64999
    install_sandbox: str = "bwrap"
    cache_dir: Path = RUN_DIR / "cache"

    @classmethod
    def of(cls, s: Any) -> InstallSettings:
        return cls(s.pip_index_url, s.pip_find_links, s.runtime_python, s.install_uid,
                   s.install_sandbox, s.cache_dir)


@dataclass(frozen=True)
class BrokerSettings:
    """Celery's broker: its Redis, this instance's task queue and keys, and when a task
    no worker acknowledged comes back (`visibility_timeout`, after the longest run a
    plugin may take and five minutes more, unless set) and how often that is looked for."""

    redis: RedisSettings = RedisSettings()
    task_queue: str = "titan.plugins"
    key_prefix: str = "titan"
    visibility_timeout: int = 900
    restore_interval: int = 60

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @classmethod
    def of(cls, s: Any) -> BrokerSettings:
        return cls(RedisSettings.of(s), s.task_queue, s.key_prefix,
                   s.visibility_timeout or s.max_timeout + 300, s.restore_interval)


@dataclass(frozen=True)
class RuntimeSettings:
    """What a run's container runs on: the image `make up` builds, whether every plugin
    runs under gVisor whatever its manifest says, and gVisor's two runtimes (the plain one,
    and one with its own network stack for runs with an egress grant)."""

    image: str = "titan-runtime:py3.11"
    isolation: str = "container"
    gvisor: str = "runsc"
    gvisor_net: str = "runsc-net"

    @classmethod
    def of(cls, s: Any) -> RuntimeSettings:
        return cls(s.runtime_image, s.isolation, s.gvisor_runtime, s.gvisor_net_runtime)



@dataclass(frozen=True)
class StreamSettings:
    """The bus's streams (events, and the rejected ones kept with their reasons), the
    managers' consumer group, and how much of each stream is kept."""

    events: str = "titan:events"
    dead: str = "titan:events:dead"
    group: str = "titan-plugin-manager"
    maxlen: int = 100_000  # entries, approximately (XADD MAXLEN ~)
    max_age: int = 7 * 24 * 3600  # seconds; older entries are trimmed

    @classmethod
    def of(cls, s: Any) -> StreamSettings:
        return cls(s.event_stream, s.dead_stream, s.consumer_group, s.stream_maxlen,
                   s.stream_max_age)


@dataclass(frozen=True)
class RecordSettings:
    """How long records and their dedup keys live, a correlation's fan-out budget, and
    where a stored outcome's events go and when they count as stored."""

    redis: RedisSettings = field(default_factory=RedisSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    record_ttl: int = 7 * 24 * 3600
    dedup_ttl: int = 24 * 3600
    fanout_budget: int = 100  # runs per correlation_id
    fanout_ttl: int = 24 * 3600

    @classmethod
    def of(cls, s: Any) -> RecordSettings:
        return cls(RedisSettings.of(s), StreamSettings.of(s), s.record_ttl, s.dedup_ttl,
                   s.fanout_budget, s.fanout_ttl)
