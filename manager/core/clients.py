"""The one factory for Redis clients: every process builds its connections here, with
the project's retry and health-check options. (Docker clients: `workers.sandbox`.)"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from manager.core.config import Settings

# A command that fails on a broken connection is retried a few times over about a second;
# longer outages surface as ConnectionError to the callers, which have their own budgets.
RETRY = Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries=3)


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url, retry=RETRY,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30, socket_keepalive=True, socket_connect_timeout=5,
        socket_timeout=max(30, settings.read_block_ms / 1000 + 10))
