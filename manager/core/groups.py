"""Settings by the part that needs them. A group is a frozen view of the flat Settings
(every TITAN_* variable keeps its documented name; `Settings.redis` builds it when
asked, so a changed copy, `with_`, never hands out a stale one), handed to a part instead
of all of them: a part's signature says what it reads, and a test can build just that.
The Redis clients take RedisSettings (manager.core.clients, manager.core.contract)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse


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

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme
