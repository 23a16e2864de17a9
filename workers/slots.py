"""Worker slots across every worker: a Redis sorted set of run leases per plugin (renewed
by the executing worker's beat), and the two rules that can make a run wait for one
(status `throttled`).

- `concurrency: N` in the manifest caps the plugin's runs at N, always.
- The fair share: while another plugin has runs waiting in the queue, no plugin holds
  more than `TITAN_PLUGIN_SHARE` of the worker slots the live workers report (at least
  one). A plugin alone on the system may use every slot. The share never raises a
  manifest's cap. A run over its share goes to the back of the queue at once (the
  runner), behind the other plugin's run, so the freed slot goes to that run.
"""

from __future__ import annotations

import time
from enum import StrEnum

import redis

from manager.core.beats import SLOT_LEASE_S, TTL_S
from manager.core.keys import Keys

# KEYS: the plugin's slots, waiting per plugin, worker slots. ARGV: now, concurrency cap
# (0: none), invocation id, lease expiry, share, plugin, beat TTL. Expired leases (a worker
# that died holding one) are dropped first, so a crash never leaks a slot for long.
# Returns 1 (granted), 0 (the manifest's cap) or -1 (over the fair share).
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 1 end
local held = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[2])
if cap > 0 and held >= cap then return 0 end
local waiting = redis.call('HGETALL', KEYS[2])
local others = false
for i = 1, #waiting, 2 do
  if waiting[i] ~= ARGV[6] and tonumber(waiting[i + 1]) > 0 then others = true; break end
end
if others then
  local total = 0
  local workers = redis.call('HGETALL', KEYS[3])
  for i = 1, #workers, 2 do
    local slots, at = string.match(workers[i + 1], '^(%d+) ([%d.]+)$')
    if slots and tonumber(at) > tonumber(ARGV[1]) - tonumber(ARGV[7]) then
      total = total + tonumber(slots)
    end
  end
  if held >= math.max(1, math.floor(total * tonumber(ARGV[5]))) then return -1 end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[4] - ARGV[1]) + 60)
return 1
"""


class Grant(StrEnum):
    """What asking for a slot gave: one, or why the run waits (titan_throttle_waits_total's
    `reason`)."""

    GRANTED = "granted"
    CONCURRENCY = "concurrency"
    SHARE = "share"


_REPLIES = {1: Grant.GRANTED, 0: Grant.CONCURRENCY, -1: Grant.SHARE}


class Slots:
    def __init__(self, conn: redis.Redis, keys: Keys, share: float) -> None:
        self.conn = conn
        self.keys = keys
        self.share = share
        self._acquire = conn.register_script(_ACQUIRE)

    def acquire(self, plugin: str, invocation_id: str, cap: int | None,
                lease_s: float = SLOT_LEASE_S) -> Grant:
        """A slot for the run, leased for `lease_s`; the beat of the worker executing the
        run renews it, so a killed worker's slot is free again soon."""
        now = time.time()
        reply = self._acquire(
            keys=[self.keys.plugin_slots(plugin), self.keys.waiting, self.keys.worker_slots],
            args=[now, cap or 0, invocation_id, now + lease_s, self.share, plugin, TTL_S])
        return _REPLIES[int(reply)]

    def release(self, plugin: str, invocation_id: str) -> None:
        self.conn.zrem(self.keys.plugin_slots(plugin), invocation_id)
