"""Worker slots across every worker: a Redis sorted set of run leases per plugin (renewed
by the executing worker's beat), and the two rules that can make a run wait for one
(status `throttled`).

- `concurrency: N` in the manifest caps the plugin's runs at N, always.
- The fair share: while another plugin has runs waiting in the queue, no plugin holds
  more than `TITAN_PLUGIN_SHARE` of the worker slots the live workers report (at least
  one). A plugin alone on the system may use every slot. The share never raises a
  manifest's cap. A run over its share goes to the back of the queue at once (the
  runner), behind the other plugin's run, so the freed slot goes to that run.

The rules are one Lua function (record_scripts); a delivery asks for its slot in the same
script that marks its run running (RecordStore.claim), and frees it in the one that stores
its outcome, so a warm run pays no round trip of its own for either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import redis

from manager.core import record_scripts as scripts
from manager.core.beats import SLOT_LEASE_S, TTL_S
from manager.core.keys import Keys


class Grant(StrEnum):
    """What asking for a slot gave: one, or why the run waits (titan_throttle_waits_total's
    `reason`)."""

    GRANTED = "granted"
    CONCURRENCY = "concurrency"
    SHARE = "share"


def grant_of(reply: bytes | str) -> Grant:
    return Grant(reply.decode() if isinstance(reply, bytes) else reply)


@dataclass(frozen=True)
class SlotAsk:
    """A run asking for one of its plugin's slots, leased for `lease_s`; the beat of the
    worker executing the run renews it, so a killed worker's slot is free again soon."""

    plugin: str
    invocation_id: str
    cap: int | None  # the manifest's `concurrency` (None: no cap)
    share: float
    lease_s: float = SLOT_LEASE_S

    def keys(self, keys: Keys) -> list[str]:
        return [keys.plugin_slots(self.plugin), keys.waiting, keys.worker_slots]

    def args(self, now: float) -> list[str | float | int]:
        """now, cap, id, lease expiry, share, plugin, beat TTL (acquire_slot's order)."""
        return [now, self.cap or 0, self.invocation_id, now + self.lease_s, self.share,
                self.plugin, TTL_S]


class Slots:
    """A slot on its own: for a takeover (the run is already running elsewhere) and for
    freeing one that no outcome freed (a retry, an error)."""

    def __init__(self, conn: redis.Redis, keys: Keys, share: float) -> None:
        self.conn = conn
        self.keys = keys
        self.share = share
        self._acquire = conn.register_script(scripts.ACQUIRE)

    def ask(self, plugin: str, invocation_id: str, cap: int | None,
            lease_s: float = SLOT_LEASE_S) -> SlotAsk:
        return SlotAsk(plugin, invocation_id, cap, self.share, lease_s)

    def acquire(self, plugin: str, invocation_id: str, cap: int | None,
                lease_s: float = SLOT_LEASE_S) -> Grant:
        ask = self.ask(plugin, invocation_id, cap, lease_s)
        return grant_of(self._acquire(keys=ask.keys(self.keys), args=ask.args(time.time())))

    def release(self, plugin: str, invocation_id: str) -> None:
        self.conn.zrem(self.keys.plugin_slots(plugin), invocation_id)
