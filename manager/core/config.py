"""Every setting, read from the environment (TITAN_*) in one place, once per process, by
pydantic-settings: types checked and converted by a maintained library, an error naming
the variable. Each process builds its Settings once at start (manager.core.wiring)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

from manager.core import groups, run_groups
from manager.core import netrules as rules
from manager.core.events import Limits
from manager.core.keys import Keys
from manager.core.paths import ROOT, RUN_DIR


def _loopback(host: str) -> bool:
    try:
        return host in ("", "localhost") or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Typed settings; `Settings.from_env()` reads TITAN_* (an empty value means the
    default); keyword overrides win (tests use them)."""

    model_config = SettingsConfigDict(env_prefix="TITAN_", env_ignore_empty=True,
                                      frozen=True, extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"  # with Sentinel: its password and db only
    # Redis behind Sentinel: "host:port,host:port,...", and the primary's name there.
    redis_sentinels: str = ""
    redis_master: str = "titan"
    # Acknowledged means replicated: a published event and a run's outcome count as stored
    # only once this many replicas confirm them (WAIT), within redis_wait_ms.
    redis_min_replicas: int = 0
    redis_wait_ms: int = 2000
    # rediss://: the CA the server's certificate must chain to, and this process's client
    # certificate and key (run/tls/, or a worker host's bundle from `make worker-cert`).
    redis_tls_ca: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    event_stream: str = "titan:events"
    dead_stream: str = "titan:events:dead"
    consumer_group: str = "titan-plugin-manager"
    key_prefix: str = "titan"
    plugins_dir: Path = ROOT / "plugins"
    run_dir: Path = RUN_DIR
    # {hostname}: one cache per worker container sharing a host directory (compose)
    cache_dir: Path = Path("{run_dir}/cache")
    runtime_image: str = "titan-runtime:py3.11"
    runtime_python: str = "3.11"
    instance: str = "default"
    api_host: str = "127.0.0.1"
    api_port: int = 8003
    # The CLI's channel: a socket only root can open (in the root-only run directory).
    api_socket: Path = Path("{run_dir}/api.sock")
    api_token: str = ""
    # HTTPS on api_port (TITAN_API_TLS=1), with a certificate of the project's CA.
    api_tls: bool = False
    api_tls_cert: Path = Path("{run_dir}/tls/servers/api.crt")
    api_tls_key: Path = Path("{run_dir}/tls/servers/api.key")
    # One client must not hold the API: requests run on api_threads threads, of which at
    # most api_waiters wait for a run (`?wait`); idle or slow connections are dropped after
    # api_channel_timeout seconds; at most api_connection_limit connections are open.
    api_threads: int = 8
    api_waiters: int = 4
    api_channel_timeout: int = 10
    api_connection_limit: int = 1000
    # The TCP ports' front (manager.api.front): head and body deadlines, a cap per peer.
    api_header_timeout_s: int = 10
    api_body_timeout_s: int = 30
    api_peer_connections: int = 32
    metrics_port: int = 8004
    # Timer triggers: the manager looks for due ticks at each tick and at least every
    # timer_pass_s (a reload is seen within it); a tick not fired within timer_grace_s
    # of its time was missed (catch_up decides what it fires).
    timer_pass_s: float = 0.2
    timer_grace_s: float = 2.0
    task_queue: str = "titan.plugins"
    # The host ids of runs (workers.identity): the first is the group every run shares, the
    # others are uids, one per live container; held through files in uid_dir (host-wide).
    run_ids: str = "2000000-2099999"
    uid_dir: str = "/run/titan/uids"
    host_etc: str = "/"  # where the host's /etc is seen from (compose workers: a mount)
    # Host roots that plugins may be granted (SPEC §4); system and project paths never are.
    allowed_roots: Annotated[tuple[Path, ...], NoDecode] = (Path("/srv/titan"),)
    # The one package index requirements.txt is installed from (wheels only).
    pip_index_url: str = "https://pypi.org/simple"
    pip_find_links: str = ""  # a local directory of wheels used instead of any index
    # pip runs as this uid (no account needed; never 0), in this sandbox: bwrap, or user
    # (no namespaces: inside a service container that is itself the boundary).
    install_uid: int = 64999
    install_sandbox: str = "bwrap"
    # Each host's cache (code, requirements) stays under this, least recently used first.
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
    max_payload_bytes: int = 128 * 1024**2  # a payload file's copy, sparse or not
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
    # A prewarmed container of a Python entrypoint holds the plugin's interpreter, started
    # and with common modules imported before the event (workers/zygote.py).
    warm_interpreter: bool = True
    # Retention.
    record_ttl: int = 7 * 24 * 3600
    stream_maxlen: int = 100_000
    stream_max_age: int = 7 * 24 * 3600  # seconds; older stream entries are trimmed
    dedup_ttl: int = 24 * 3600
    # Delivery: unacknowledged tasks come back after visibility_timeout (0: max_timeout + 300).
    visibility_timeout: int = 0
    restore_interval: int = 60  # how often workers look for tasks whose worker died
    sandbox_patience_s: int = 300  # an engine away is waited out this long (Redis's clock)
    retry_backoff_max: int = 60
    throttle_backoff_max: int = 30
    # Fairness: while other plugins wait, one plugin holds at most this part of the worker
    # slots the live workers report (at least one slot).
    plugin_share: float = Field(0.5, gt=0, le=1)
    # Isolation: "container" lets each manifest choose (`isolation:`); "gvisor" runs every
    # plugin under gVisor. The engine must have the runtime registered under this name.
    isolation: Literal["container", "gvisor"] = "container"
    gvisor_runtime: str = "runsc"
    gvisor_net_runtime: str = "runsc-net"  # its own network stack, for egress grants
    # Egress (SPEC §4): the ceiling of any grant (host:port patterns; empty: no network),
    # a hosts(5) file the proxy reads before DNS, its state, network, port, uid, caps.
    egress_allow: Annotated[tuple[str, ...], NoDecode] = ()
    egress_hosts: str = ""
    # (one proxy per instance on a host: its directory, network and bridge name it)
    egress_dir: Path = Path("/run/titan/egress/{instance}")
    egress_network: str = "titan-egress-{instance}"
    egress_bridge: str = ""  # default: tteg + a hash of the instance (15 characters at most)
    egress_port: int = 3128
    egress_user: str = "titan-proxy"
    egress_max_connections: int = 64
    egress_max_bytes: int = 64 * 1024**2
    # Plugin secrets: the key they are encrypted with in Redis (a worker host's bundle
    # carries it), and the tmpfs a worker puts each run's files on.
    secrets_key: Path = Path("{run_dir}/secrets.key")
    secret_files_dir: Path = Path("/run/titan/secrets")
    finish_budget_s: int = 3600  # how long a finished run waits for Redis to come back
    sweep_interval_s: int = 30  # how often the manager looks for abandoned runs
    sweep_grace_s: int = 30  # a run must look abandoned this long before it is swept
    max_requeues: int = 3  # sweeper re-queues per run before it is marked lost
    # Listener.
    reclaim_idle_ms: int = 60_000
    max_deliveries: int = 5  # a stream entry that fails this often is dead-lettered
    housekeeping_s: int = 15  # how often the manager reclaims, trims and sweeps
    read_block_ms: int = 1000
    worker_name: str = Field(default_factory=socket.gethostname)

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Secrets as files: with TITAN_SECRETS_DIR (compose: /run/secrets), a file named
        after a variable (`titan_redis_url`, `titan_api_token`) gives its value, so no
        secret has to be in a process's environment, where `docker inspect` and every
        child see it. The environment still wins."""
        secrets_dir = os.environ.get("TITAN_SECRETS_DIR")
        files = ((SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir),)
                 if secrets_dir else ())
        return (init_settings, env_settings, *files)

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _paths(cls, raw: Any) -> Any:
        """A colon- (or comma-) separated list of directories."""
        if isinstance(raw, str):
            return tuple(Path(p) for p in raw.replace(",", ":").split(":") if p.strip())
        return raw

    @field_validator("egress_allow", mode="before")
    @classmethod
    def _patterns(cls, raw: Any) -> Any:
        """Comma- (or space-) separated host:port patterns, each checked."""
        if isinstance(raw, str):
            raw = tuple(p for p in raw.replace(",", " ").split() if p)
        for pattern in raw:
            rules.parse(pattern)
        return raw

    @model_validator(mode="after")
    def _channel(self) -> Settings:
        """The password never crosses a network in clear: plain redis:// only to this
        host's loopback; rediss:// needs the CA to check the server against."""
        url = urlparse(self.redis_url)
        hosts = [url.hostname or ""] + [h for h, _ in groups.sentinels_of(self.redis_sentinels)]
        if url.scheme == "redis" and not all(_loopback(h) for h in hosts):
            raise ValueError(
                f"plain redis:// to {', '.join(h for h in hosts if not _loopback(h))} "
                "would send the password and every event in clear: use rediss:// with "
                "TITAN_REDIS_TLS_CA, TITAN_REDIS_TLS_CERT and TITAN_REDIS_TLS_KEY "
                "(`make worker-cert`; docs/architecture.md, Add worker hosts)")
        if url.scheme == "rediss" and not self.redis_tls_ca:
            raise ValueError("rediss:// needs TITAN_REDIS_TLS_CA (the CA bundle the "
                             "server's certificate must chain to)")
        return self

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        """Paths under the run directory unless given; {hostname} in the cache's."""
        for name in ("cache_dir", "api_socket", "api_tls_cert", "api_tls_key", "secrets_key"):
            value = str(getattr(self, name))
            value = value.replace("{run_dir}", str(self.run_dir))
            object.__setattr__(self, name, Path(value.replace("{hostname}",
                                                              socket.gethostname())))
        object.__setattr__(self, "egress_dir",
                           Path(str(self.egress_dir).replace("{instance}", self.instance)))
        object.__setattr__(self, "egress_network",
                           self.egress_network.replace("{instance}", self.instance))
        if not self.egress_bridge:
            digest = hashlib.sha256(self.instance.encode()).hexdigest()[:8]
            object.__setattr__(self, "egress_bridge", f"tteg{digest}")
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """TITAN_* variables and keyword overrides; a bad value raises ValueError naming
        the variable and what it must be."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = [f"TITAN_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}, got "
                        f"{e.get('input')!r}" if e["loc"] else
                        str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
            raise ValueError("; ".join(problems)) from None

    # The groups a part is handed (manager.core.groups, then manager.core.run_groups)
    redis = property(groups.RedisSettings.of)
    egress = property(groups.EgressSettings.of)
    api = property(groups.ApiSettings.of)
    timers = property(groups.TimerSettings.of)
    prewarm = property(groups.PrewarmSettings.of)
    sandbox = property(groups.SandboxSettings.of)
    limits = property(groups.LimitSettings.of)
    fs = property(groups.FsSettings.of)
    install = property(groups.InstallSettings.of)
    broker = property(groups.BrokerSettings.of)
    runtime = property(groups.RuntimeSettings.of)
    stream = property(groups.StreamSettings.of)
    records = property(groups.RecordSettings.of)
    output = property(run_groups.OutputSettings.of)
    identity = property(run_groups.IdentitySettings.of)
    cache = property(run_groups.CacheSettings.of)
    engine = property(run_groups.EngineSettings.of)
    plugin = property(run_groups.PluginSettings.of)

    @property
    def keys(self) -> Keys:
        """Every Redis key of this instance (its prefix)."""
        return Keys(self.key_prefix)

    @property
    def event_limits(self) -> Limits:  # every reader's: the listener, the API, a run's results
        return Limits(self.max_event_bytes, self.max_event_depth)

    def with_(self, **changes: Any) -> Settings:
        return self.model_copy(update=changes)
