"""The one factory for Redis clients: every process builds its connections here, with
the project's retry and health-check options, straight to `redis_url` or through Sentinel
(`redis_sentinels`), and the one place that confirms a write reached the replicas.
(Docker clients: `workers.engine`.)

Through Sentinel, a client asks the Sentinels for the primary and follows a failover by
itself: a connection error, or a ReadOnlyError from a primary that was demoted, drops
the connection and the retry asks the Sentinels again (redis-py's SentinelManagedConnection);
Lua scripts missing on the new primary are loaded again (redis-py's Script on NOSCRIPT).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from manager.core.errors import NotReplicated
from manager.core.groups import RedisSettings

# A command that fails on a broken connection is retried a few times over about a second;
# longer outages surface as ConnectionError to the callers, which have their own budgets.
# Through Sentinel, a failover takes a few seconds more: more retries, longer waits.
RETRY = Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries=3)
FAILOVER_RETRY = Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.1), retries=12)


def text(reply: bytes | str) -> str:
    """A reply as text, whether the client decodes replies or not."""
    return reply.decode() if isinstance(reply, bytes) else reply


def password_and_db(settings: RedisSettings) -> tuple[str | None, int]:
    """The password and db of redis_url: redis://[user:pw@]host:port/DB, or
    unix://[user:pw@]/path/to/redis.sock?db=DB."""
    url = urlparse(settings.url)
    if url.scheme == "unix":
        db = parse_qs(url.query).get("db", ["0"])[0]
    else:
        db = (url.path or "/0").strip("/") or "0"
    return (unquote(url.password) if url.password else None, int(db))


def is_socket(settings: RedisSettings) -> bool:
    """Redis on this host's unix socket (what `make up` starts), not over TCP."""
    return urlparse(settings.url).scheme == "unix"


def uses_tls(settings: RedisSettings) -> bool:
    """rediss://: every connection (to the data nodes and to the Sentinels) is TLS."""
    return urlparse(settings.url).scheme == "rediss"


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's TLS options: the server's certificate must chain to the project's CA and
    name the address connected to; our own certificate is presented. The handshake, and so
    both checks, comes before any command: the password is never sent to a server that
    failed them."""
    if not uses_tls(settings):
        return {}
    return {"ssl_ca_certs": settings.tls_ca, "ssl_cert_reqs": "required",
            "ssl_check_hostname": True, "ssl_min_version": ssl.TLSVersion.TLSv1_2,
            "ssl_certfile": settings.tls_cert or None,
            "ssl_keyfile": settings.tls_key or None}


def describe(exc: Exception, settings: RedisSettings) -> str:
    """A Redis error as an operator should read it: a plain redis:// URL whose port
    speaks TLS only says how to connect instead."""
    url = urlparse(settings.url)
    if (isinstance(exc, redis.ConnectionError) and url.scheme == "redis"
            and not settings.sentinels and speaks_tls(url.hostname or "127.0.0.1",
                                                               url.port or 6379)):
        return (f"Redis at {url.hostname}:{url.port or 6379} accepts TLS only: use a "
                "rediss:// URL (TITAN_REDIS_URL) and set TITAN_REDIS_TLS_CA, "
                "TITAN_REDIS_TLS_CERT and TITAN_REDIS_TLS_KEY to the bundle from `make "
                "worker-cert` (docs/architecture.md, Add worker hosts)")
    if isinstance(exc, redis.ConnectionError) and uses_tls(settings):
        if "certificate verify failed" in str(exc):
            return (f"{exc}: the server's certificate does not chain to "
                    f"{settings.tls_ca} or does not name {url.hostname} (is this our "
                    "Redis? the password was not sent)")
        if not settings.tls_cert:
            return (f"{exc} (no client certificate: Redis requires one; set "
                    "TITAN_REDIS_TLS_CERT and TITAN_REDIS_TLS_KEY from `make worker-cert`)")
    return str(exc)


def speaks_tls(host: str, port: int) -> bool:
    """Whether the port answers a TLS ClientHello (nothing secret is sent: the handshake
    is not verified and nothing follows it)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=2) as raw, \
                probe.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLError as exc:  # a TLS alert (no client certificate) is TLS too
        return "alert" in str(exc).lower() or "certificate" in str(exc).lower()
    except OSError:
        return False


def redis_client(settings: RedisSettings) -> redis.Redis:
    options: dict[str, Any] = {
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 30,
        "socket_timeout": max(30, settings.read_block_ms / 1000 + 10)}
    if not is_socket(settings):
        options.update(socket_keepalive=True, socket_connect_timeout=5)
    tls = tls_options(settings)
    if not settings.sentinels:
        return redis.Redis.from_url(settings.url, retry=RETRY, **options, **tls)
    password, db = password_and_db(settings)
    tls_flag = {"ssl": True, **tls} if tls else {}
    sentinel = Sentinel(list(settings.sentinels),
                        sentinel_kwargs={"password": password, "socket_timeout": 2,
                                         "socket_connect_timeout": 2, **tls_flag})
    return sentinel.master_for(settings.master, redis_class=redis.Redis,
                               password=password, db=db, retry=FAILOVER_RETRY, **options,
                               **tls_flag)


def confirm_replicated(pipe: Any, settings: RedisSettings) -> None:
    """Adds a WAIT for the replicas to a pipeline holding the write(s) to confirm (WAIT
    covers what was written on its own connection, so it rides the same pipeline)."""
    if settings.min_replicas:
        pipe.execute_command("WAIT", settings.min_replicas, settings.wait_ms)


def check_replicated(replies: list[Any], settings: RedisSettings, what: str) -> list[Any]:
    """The pipeline's replies without the WAIT's; raises NotReplicated when too few replicas
    confirmed."""
    if not settings.min_replicas:
        return replies
    *rest, acked = replies
    if int(acked) < settings.min_replicas:
        raise NotReplicated(
            f"{what} is on the Redis primary but only {acked} of "
            f"{settings.min_replicas} replica(s) confirmed it within "
            f"{settings.wait_ms} ms (TITAN_REDIS_MIN_REPLICAS): is the replica up? "
            "It is kept; a failover now could lose it", replicas=int(acked),
            wanted=settings.min_replicas)
    return rest
