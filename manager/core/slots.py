"""Worker slots across every worker: a Redis sorted set of run leases per plugin (renewed
by the executing worker's beat), and the two rules that can make a run wait for one
(status `throttled`).

- `concurrency: N` in the manifest caps the plugin's runs at N, always.
- The fair share: while another plugin has runs waiting in the queue, no plugin holds
  more than `TITAN_PLUGIN_SHARE` times its `weight` of the worker slots the live workers
  report (at least one). A plugin alone on the system may use every slot. The share
  never raises a manifest's cap. A run over its share goes to the back of the queue at
  once (workers.claim.throttle), behind the other plugin's run, so the freed slot goes to
  that run.

The rules are one Lua function (manager/core/lua/lib.lua), on Redis's clock; a delivery
asks for its slot in the same script that marks its run running (RecordStore.claim), and
frees it in the one that stores its outcome, so a warm run pays no round trip of its own
for either. A run's hold (its lease, with its slot's) is renewed by the process running
it, so a killed worker's runs and slots come free within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from manager.core.beats import TTL_S
from manager.core.clients import text
from manager.core.keys import Keys
from manager.core.scripts import Scripts, named

SLOT_LEASE_S = 30  # a worker slot taken by a run lasts this long unless its worker renews it
LEASE_TTL_S = 10  # a run's holder lease lasts this long unless the process running it renews it
# A held run's sweeper deadline, renewed with its lease: it passes one whole lease after
# the lease lapsed, so a run the sweeper finds due and unheld has lost its process.
HELD_FOR_S = 2 * LEASE_TTL_S


class SlotGrant(StrEnum):
    """What asking for a slot gave: one, or why the run waits (titan_throttle_waits_total's
    `reason`)."""

    GRANTED = "granted"
    CONCURRENCY = "concurrency"
    SHARE = "share"


def grant_of(reply: bytes | str) -> SlotGrant:
    return SlotGrant(text(reply))


@dataclass(frozen=True)
class SlotAsk:
    """A run asking for one of its plugin's slots, leased for `lease_s` on Redis's clock;
    the beat of the worker executing the run renews it, so a killed worker's slot is free
    again soon."""

    plugin: str
    invocation_id: str
    cap: int | None  # the manifest's `concurrency` (None: no cap)
    share: float
    lease_s: float = SLOT_LEASE_S
    weight: int = 1  # the manifest's: scales the share

    def keys(self, keys: Keys) -> list[str]:
        return [keys.plugin_slots(self.plugin), keys.waiting, keys.worker_slots]

    def named(self) -> dict[str, Any]:
        """acquire_slot's argument table (manager/core/lua/lib.lua)."""
        return {"plugin": self.plugin, "id": self.invocation_id, "cap": self.cap or 0,
                "lease_s": self.lease_s, "share": self.share, "weight": self.weight,
                "beat_ttl": TTL_S}


class Slots:
    """A slot on its own: for a takeover (the run is already running elsewhere), freeing
    one that no outcome freed (a retry, an error), and renewing those a worker's runs hold
    with each of its beats."""

    def __init__(self, conn: redis.Redis, keys: Keys, share: float) -> None:
        self.conn = conn
        self.keys = keys
        self.share = share
        self.scripts = Scripts(conn)

    def ask(self, plugin: str, invocation_id: str, cap: int | None,
            lease_s: float = SLOT_LEASE_S, weight: int = 1) -> SlotAsk:
        return SlotAsk(plugin, invocation_id, cap, self.share, lease_s, weight)

    def acquire(self, plugin: str, invocation_id: str, cap: int | None,
                lease_s: float = SLOT_LEASE_S, weight: int = 1) -> SlotGrant:
        ask = self.ask(plugin, invocation_id, cap, lease_s, weight)
        return grant_of(self.scripts.acquire(keys=ask.keys(self.keys),
                                             args=[named(**ask.named())]))

    def release(self, plugin: str, invocation_id: str) -> None:
        self.conn.zrem(self.keys.plugin_slots(plugin), invocation_id)

    def renew(self, worker: str, slots: int) -> None:
        """A worker's beat: its slot count, seen now on Redis's clock (the fair share counts
        the slots of the workers seen within a beat's TTL)."""
        self.scripts.renew(keys=[self.keys.worker_slots], args=[named(name=worker,
                                                                      slots=slots)])

    def hold(self, plugin: str, invocation_id: str, holder: str, take: bool = False) -> None:
        """A run in progress, renewed by the process running it: its holder lease, its
        worker slot's lease and its sweeper deadline (all end soon after that process
        dies). `take`: the lease is set even when there is none (a takeover); else only a
        live one is renewed."""
        self.scripts.hold(keys=[self.keys.lease(invocation_id),
                                self.keys.plugin_slots(plugin), self.keys.inflight,
                                self.keys.invocation(invocation_id)],
                          args=[named(id=invocation_id, holder=holder, lease_ttl=LEASE_TTL_S,
                                      slot_lease_s=SLOT_LEASE_S, held_for=HELD_FOR_S,
                                      take=take or None)])

    def held(self, invocation_ids: list[str]) -> set[str]:
        """The runs among these that a live process holds (their lease has not expired)."""
        if not invocation_ids:
            return set()
        pipe = self.conn.pipeline(transaction=False)
        for invocation_id in invocation_ids:
            pipe.exists(self.keys.lease(invocation_id))
        return {i for i, held in zip(invocation_ids, pipe.execute(), strict=True) if held}

    def holder(self, invocation_id: str) -> str | None:
        """Who holds a run right now (its lease), or None."""
        held = self.conn.get(self.keys.lease(invocation_id))
        return None if held is None else text(held)

    def let_go(self, plugin: str, invocation_id: str) -> None:
        """This delivery no longer holds the run (it goes back to the queue, or it failed
        here): its lease and its slot."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.delete(self.keys.lease(invocation_id))
        pipe.zrem(self.keys.plugin_slots(plugin), invocation_id)
        pipe.execute()
