"""The worker heartbeat, typed: what each worker's main process reports every few seconds
(liveness, its Docker engine's state, its slots, the images and runtimes its engine has),
and the one place that stores and lists them. (Who holds a run is its own lease, renewed
by the process running it: manager.core.slots.)

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


@dataclass(frozen=True)
class WorkerBeat:
    name: str
    pid: int
    docker_ok: bool
    docker_error: str | None = None
    images: tuple[str, ...] = ()  # images on its engine (for reload's image check)
    slots: int = 0  # runs it can execute at once (its pool's processes)
    runtimes: tuple[str, ...] = ()  # container runtimes its engine has (runc, runsc, ...)
    # host accounts, groups or subordinate ranges within TITAN_RUN_IDS (never leased)
    run_id_conflicts: tuple[str, ...] = ()
    # processes beside its gVisor runs holding their Sentries' uid (workers.sentries)
    sentry_neighbours: tuple[str, ...] = ()
    # its prewarmed containers per plugin (ready or serving a run)
    prewarmed: dict[str, int] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def save(self, conn: redis.Redis, keys: Keys, ttl: int = TTL_S) -> None:
        """Stores the beat, in one round trip. (Its worker slots are counted with it:
        manager.core.slots.Slots.renew; the runs it executes are held by the processes
        running them: Slots.hold.)"""
        pipe = conn.pipeline(transaction=False)
        pipe.set(keys.worker_heartbeat(self.name), json.dumps(asdict(self)), ex=ttl)
        pipe.sadd(keys.workers, self.name)
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
                   docker_error=data.get("docker_error"),
                   images=tuple(data.get("images") or ()), slots=int(data.get("slots") or 0),
                   runtimes=tuple(data.get("runtimes") or ()),
                   run_id_conflicts=tuple(data.get("run_id_conflicts") or ()),
                   sentry_neighbours=tuple(data.get("sentry_neighbours") or ()),
                   prewarmed={str(k): int(v) for k, v in
                              (data.get("prewarmed") or {}).items()},
                   time=float(data["time"]))

    @classmethod
    def get(cls, conn: redis.Redis, keys: Keys, name: str) -> WorkerBeat | None:
        raw = conn.get(keys.worker_heartbeat(name))
        return cls.decode(raw) if raw else None

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
