"""The worker heartbeat, typed: what each worker's main process reports every few seconds
(liveness, its Docker engine's state, the runs it holds, the images its engine has), and
the one place that stores and lists them. Each beat also renews a lease per run it holds
(`Keys.lease`), so whether anyone holds a run is one key lookup, not a read of every beat.

Like rq's worker registry, beats are listed from a set of names (`Keys.workers`), not by
scanning the keyspace; a name whose beat expired is dropped from the set when listed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from manager.core.keys import Keys

TTL_S = 10  # a worker that has not beaten for this long is gone
SLOT_LEASE_S = 30  # a worker slot taken by a run lasts this long unless its worker renews it


@dataclass(frozen=True)
class WorkerBeat:
    name: str
    pid: int
    docker_ok: bool
    docker_error: str | None = None
    held: tuple[str, ...] = ()  # invocation ids it accepted or prefetched
    images: tuple[str, ...] = ()  # images on its engine (for reload's image check)
    slots: int = 0  # runs it can execute at once (its pool's processes)
    runtimes: tuple[str, ...] = ()  # container runtimes its engine has (runc, runsc, ...)
    time: float = field(default_factory=time.time)

    def save(self, conn: redis.Redis, keys: Keys, ttl: int = TTL_S,
             active: dict[str, str] | None = None) -> None:
        """Stores the beat and renews the lease of every run it holds, and the worker slot
        of every run it executes (`active`: invocation id -> plugin), in one round trip: a
        killed worker's slots come free within SLOT_LEASE_S."""
        pipe = conn.pipeline(transaction=False)
        expiry = time.time() + SLOT_LEASE_S
        for invocation_id, plugin in (active or {}).items():
            if plugin:
                pipe.zadd(keys.plugin_slots(plugin), {invocation_id: expiry}, xx=True)
        pipe.set(keys.worker_heartbeat(self.name), json.dumps(asdict(self)), ex=ttl)
        pipe.sadd(keys.workers, self.name)
        pipe.hset(keys.worker_slots, self.name, f"{self.slots} {self.time:.3f}")
        for invocation_id in self.held:
            pipe.set(keys.lease(invocation_id), self.name, ex=ttl)
        pipe.execute()

    def remove(self, conn: redis.Redis, keys: Keys) -> None:
        pipe = conn.pipeline(transaction=False)
        pipe.delete(keys.worker_heartbeat(self.name))
        pipe.srem(keys.workers, self.name)
        pipe.hdel(keys.worker_slots, self.name)
        pipe.execute()

    def health(self) -> dict[str, Any]:
        """The docker part of /health, as each worker reports it."""
        return {"ok": self.docker_ok, **({"error": self.docker_error}
                                         if self.docker_error else {})}

    @classmethod
    def decode(cls, raw: bytes | str) -> WorkerBeat:
        data = json.loads(raw)
        return cls(name=data["name"], pid=int(data["pid"]), docker_ok=bool(data["docker_ok"]),
                   docker_error=data.get("docker_error"), held=tuple(data.get("held") or ()),
                   images=tuple(data.get("images") or ()), slots=int(data.get("slots") or 0),
                   runtimes=tuple(data.get("runtimes") or ()),
                   time=float(data["time"]))

    @classmethod
    def get(cls, conn: redis.Redis, keys: Keys, name: str) -> WorkerBeat | None:
        raw = conn.get(keys.worker_heartbeat(name))
        return cls.decode(raw) if raw else None

    @staticmethod
    def leased(conn: redis.Redis, keys: Keys, invocation_ids: list[str]) -> set[str]:
        """The runs among these that a live worker holds (their lease has not expired)."""
        if not invocation_ids:
            return set()
        pipe = conn.pipeline(transaction=False)
        for invocation_id in invocation_ids:
            pipe.exists(keys.lease(invocation_id))
        return {i for i, held in zip(invocation_ids, pipe.execute(), strict=True) if held}

    @classmethod
    def all(cls, conn: redis.Redis, keys: Keys) -> list[WorkerBeat]:
        """Every live worker's last beat, by name."""
        names = sorted(n.decode() for n in conn.smembers(keys.workers))
        if not names:
            return []
        raws = conn.mget([keys.worker_heartbeat(n) for n in names])
        gone = [n for n, raw in zip(names, raws, strict=True) if raw is None]
        if gone:
            conn.srem(keys.workers, *gone)
            conn.hdel(keys.worker_slots, *gone)
        return [cls.decode(raw) for raw in raws if raw is not None]
