"""Per-plugin concurrency across every worker: a Redis sorted set of run leases."""

from __future__ import annotations

import time

import redis

from manager.core.keys import Keys

# KEYS[1] slots; ARGV: now, limit, invocation id, lease expiry. Expired leases (a worker
# that died holding one) are dropped first, so a crash never leaks a slot for long.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[4] - ARGV[1]) + 60)
  return 1
end
return 0
"""


class Slots:
    def __init__(self, conn: redis.Redis, keys: Keys) -> None:
        self.conn = conn
        self.keys = keys
        self._acquire = conn.register_script(_ACQUIRE)

    def acquire(self, plugin: str, invocation_id: str, limit: int, lease_s: float) -> bool:
        now = time.time()
        return bool(self._acquire(keys=[self.keys.plugin_slots(plugin)],
                                  args=[now, limit, invocation_id, now + lease_s]))

    def release(self, plugin: str, invocation_id: str) -> None:
        self.conn.zrem(self.keys.plugin_slots(plugin), invocation_id)
