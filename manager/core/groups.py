"""Settings by the part that needs them. A group is a frozen view of the flat Settings
(every TITAN_* variable keeps its documented name; `Settings.redis` builds it when
asked, so a changed copy, `with_`, never hands out a stale one), handed to a part instead
of all of them: a part's signature says what it reads, and a test can build just that.
The Redis clients take RedisSettings (manager.core.clients, manager.core.contract);
the egress proxy and its grants EgressSettings (manager.egress); the API's front
ApiSettings (manager.api.front)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    socket: Path = Path("run/api.sock")  # the CLI's channel, root's alone
    token: str = ""
    tls: bool = False
    tls_cert: Path = Path("run/tls/servers/api.crt")
    tls_key: Path = Path("run/tls/servers/api.key")
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
