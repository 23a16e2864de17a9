"""The bus listener: stream entry -> validated event -> matched plugins -> dispatched tasks.

Reads `titan:events` through a consumer group and acknowledges an entry only after its
tasks are enqueued (or it was dead-lettered), so a crash never loses an event; entries
left pending by a dead consumer are reclaimed with XAUTOCLAIM.

What the listener owes Redis after a batch (acknowledgements, what became of each entry,
the `queued` marks of the runs it sent) rides in the pipeline of its next read, ahead of
the blocking XREADGROUP: Redis carries them out at once, in order, and the read costs the
one round trip it costs anyway. The registry's version is read in the same pipeline,
after the entries, so a reload that finished before an event arrived is always seen.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from manager.bus.dispatch import Dispatcher, Owed
from manager.bus.group import ensure_group
from manager.bus.index import TriggerIndex
from manager.core.clients import describe
from manager.core.errors import BudgetExceeded, EventError
from manager.core.events import Event
from manager.core.groups import StreamSettings
from manager.core.observer import observer
from manager.core.record_store import Charge
from manager.core.retry import REDIS_RECONNECT
from manager.core.wiring import Wiring
from manager.plugins.loader import PluginEntry
from manager.plugins.registry import Registry

log = logging.getLogger(__name__)
ENTRY_OUTCOME_TTL_S = 900  # how long `publish --wait` can learn what became of an entry


def dead_letter(conn: redis.Redis, stream: StreamSettings, raw: bytes | str, reason: str,
                detail: str, entry_id: str = "") -> None:
    """Keeps a rejected event with its reason; nothing is silently dropped."""
    conn.xadd(stream.dead,
              {"event": raw, "reason": reason, "detail": detail[:2000], "entry_id": entry_id,
               "time": f"{time.time():.3f}"},
              maxlen=stream.maxlen, approximate=True)
    observer().dead_lettered(reason)
    log.warning("dead-lettered %s: %s: %s", entry_id or "an event", reason, detail[:300])


class Listener:
    """One consumer of the group; several may run (on several hosts) side by side.

    A failure handling one entry never delays the others of its batch: the entry stays
    pending, comes back through XAUTOCLAIM, and after `max_deliveries` deliveries it is
    dead-lettered as `unprocessable` with its last error."""

    def __init__(self, wiring: Wiring, registry: Registry, dispatcher: Dispatcher,
                 consumer: str | None = None,
                 housekeeping: Callable[[], object] | None = None) -> None:
        self.conn = wiring.conn
        self.settings = settings = wiring.settings
        self.registry = registry
        self.dispatcher = dispatcher
        self.owed: list[Owed] = []  # writes that ride in the next read's pipeline
        self.acked: list[str] = []  # entries acknowledged, in one XACK after those writes
        self.keys = wiring.keys
        self.consumer = consumer or f"{settings.worker_name}-{id(self):x}"
        self.limits = settings.event_limits
        self.stream = settings.stream
        self.housekeeping = housekeeping
        self.stopping = threading.Event()
        self._last_reclaim = 0.0
        # the trigger index and the entries it was built from (rebuilt when they change)
        self._index: tuple[dict, TriggerIndex] | None = None

    def run(self) -> None:
        """Loops until stop(); survives Redis outages by reconnecting with backoff."""
        failures, group_ok = 0, False
        while not self.stopping.is_set():
            try:
                if not group_ok:  # at start, and after an error (Redis may have lost it)
                    ensure_group(self.conn, self.stream)
                    group_ok = True
                self.poll()
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                group_ok, wait = False, REDIS_RECONNECT.delay(failures)
                log.warning("listener: Redis unavailable (%s); retrying in %.1fs",
                            describe(exc, self.settings.redis), wait)
                self.stopping.wait(wait)
                failures += 1
            except Exception:
                group_ok, wait = False, REDIS_RECONNECT.delay(failures)
                log.exception("listener: unexpected error; retrying in %.1fs", wait)
                self.stopping.wait(wait)
                failures += 1
        try:
            self.flush()
        except redis.RedisError as exc:  # the entries stay pending and are reclaimed
            log.warning("listener: could not acknowledge on the way out: %s", exc)

    def stop(self) -> None:
        self.stopping.set()

    def poll(self) -> int:
        """Handles one batch: reclaimed entries first, then new ones. Returns entries done."""
        done = 0
        if time.monotonic() - self._last_reclaim > self.settings.housekeeping_s:
            self._last_reclaim = time.monotonic()
            self.trim()
            done += self.reclaim()
            if self.housekeeping is not None:
                self.housekeeping()
        reply, version = self.read()
        for _stream, entries in reply or []:
            done += self.handle_batch(entries, version)
        return done

    def read(self) -> tuple[Any, int]:
        """One round trip: what is owed, then the next batch (blocking), then the registry
        version. What is owed is dropped only once Redis has taken it."""
        pipe = self.owed_pipeline()
        pipe.xreadgroup(self.stream.group, self.consumer,
                        {self.stream.events: ">"}, count=64,
                        block=self.settings.read_block_ms)
        pipe.get(self.keys.registry_version)
        *replies, reply, version = pipe.execute(raise_on_error=False)
        self.owed.clear()
        self.acked.clear()
        for failed in [r for r in (*replies, reply, version) if isinstance(r, Exception)]:
            if failed is reply or failed is version:
                raise failed
            log.error("listener: a write sent with the read failed: %s", failed)
        return reply, int(version or 0)

    def flush(self) -> None:
        """Sends what is owed now (on the way out; tests that drive poll() by hand)."""
        if self.owed or self.acked:
            self.owed_pipeline().execute()
            self.owed.clear()
            self.acked.clear()

    def owed_pipeline(self) -> redis.client.Pipeline:
        """A pipeline holding what is owed (kept in `owed` and `acked` until Redis has
        taken it): the writes first, then one acknowledgement of every entry they were for
        (an entry is never acknowledged ahead of what became of it)."""
        pipe = self.conn.pipeline(transaction=False)
        for owed in self.owed:
            owed(pipe)
        if self.acked:
            pipe.xack(self.stream.events, self.stream.group, *self.acked)
        return pipe

    def handle_batch(self, entries: list[tuple[bytes, dict[bytes, bytes]]],
                     version: int | None = None) -> int:
        """`version`: the registry's, read with the batch (None: read it now)."""
        for entry_id, fields in entries:
            if fields:
                self.handle_isolated(entry_id.decode(), fields, version)
            else:  # a deleted entry comes back empty
                self.ack(entry_id.decode(), {})
        return len(entries)

    def handle_isolated(self, entry_id: str, fields: dict[bytes, bytes],
                        version: int | None = None) -> None:
        """Handles one entry; its failure (other than Redis being down) stays its own."""
        try:
            self.handle(entry_id, fields, version)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as exc:
            log.exception("listener: entry %s failed", entry_id)
            self.give_up_if_exhausted(entry_id, fields, exc)

    def give_up_if_exhausted(self, entry_id: str, fields: dict[bytes, bytes],
                             exc: Exception) -> None:
        pending = self.conn.xpending_range(self.stream.events,
                                           self.stream.group, min=entry_id,
                                           max=entry_id, count=1)
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        if deliveries < self.settings.max_deliveries:
            return  # stays pending; reclaimed after reclaim_idle_ms
        error = f"{type(exc).__name__}: {exc}"
        dead_letter(self.conn, self.stream, fields.get(b"event", b""), "unprocessable",
                    f"failed {deliveries} times; last error: {error}", entry_id)
        log.error("listener: entry %s dead-lettered after %d deliveries: %s", entry_id,
                  deliveries, error)
        self.ack(entry_id, {"_dead": json.dumps(f"unprocessable: {error}")})

    def trim(self) -> None:
        """Retention by age (by length, XADD's MAXLEN already trims as entries arrive)."""
        min_id = int((time.time() - self.stream.max_age) * 1000)
        for stream in (self.stream.events, self.stream.dead):
            self.conn.xtrim(stream, minid=min_id)

    def reclaim(self) -> int:
        """Takes over entries another consumer (or a failed attempt) left unacknowledged."""
        done, start = 0, "0-0"
        while True:
            start, entries, *_ = self.conn.xautoclaim(
                self.stream.events, self.stream.group, self.consumer,
                min_idle_time=self.settings.reclaim_idle_ms, start_id=start, count=64)
            done += self.handle_batch(entries)
            if start in (b"0-0", "0-0"):
                return done

    def handle(self, entry_id: str, fields: dict[bytes, bytes],
               version: int | None = None) -> None:
        """Validates, matches and dispatches one entry, then acknowledges it; a rejected
        entry is dead-lettered first. A failed dispatch leaves it pending for reclaim."""
        raw: bytes | str | None = fields.get(b"event")
        try:
            if raw is None:
                raw = json.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                                  for k, v in fields.items()})
                raise EventError("stream entry has no 'event' field", field="event",
                                 reason="invalid_event")
            event = Event.decode(raw, self.limits)
            index = self.index(version)
            observer().event_received(event.topic, index.topics)
            if event.hops > self.settings.max_hops:
                raise EventError(f"hops {event.hops} is over the limit {self.settings.max_hops}",
                                 field="hops", reason="hops_exceeded")
            plugins = index.match(event)
            runs = self.dispatch(entry_id, event, plugins)
        except (EventError, BudgetExceeded) as exc:
            reason = exc.details.get("reason", exc.code)
            dead_letter(self.conn, self.stream, raw, reason, exc.message, entry_id)
            self.ack(entry_id, {"_dead": json.dumps(f"{reason}: {exc.message}")})
            return
        self.ack(entry_id, runs)

    def index(self, version: int | None) -> TriggerIndex:
        """The trigger index of the registry's entries, built once per version (the
        registry hands back the same entries until its version moves)."""
        entries = self.registry.entries(version=version)
        if self._index is None or self._index[0] is not entries:
            self._index = (entries, TriggerIndex.of(entries.values()))
        return self._index[1]

    def dispatch(self, entry_id: str, event: Event, plugins: list[PluginEntry],
                 ) -> dict[str, str]:
        """Each matched plugin's run, charged to the budget with its record (the entry
        once, for all of them: all are charged and created, or BudgetExceeded from the
        first). Returns what became of the entry, per plugin."""
        charge = Charge(event.correlation, len(plugins), entry_id)
        runs: dict[str, str] = {}
        for plugin in plugins:
            invocation_id, sent = self.dispatcher.dispatch(event, plugin, charge=charge,
                                                           owed=self.owed)
            if sent:
                observer().dispatched(plugin.name)
            else:
                self.duplicate(event, plugin.name, invocation_id)
            runs[plugin.name] = json.dumps({"invocation_id": invocation_id,
                                            "duplicate": not sent})
        return runs

    def duplicate(self, event: Event, plugin: str, invocation_id: str) -> None:
        observer().duplicate(plugin)
        log.info("event %s is a duplicate for %s: its event_id already ran it as %s; "
                 "publish it with a new event_id (or none) to run again", event.event_id,
                 plugin, invocation_id)

    def ack(self, entry_id: str, outcome: dict[str, str]) -> None:
        """Acknowledges the entry and keeps, briefly, what was done with it, if anything
        (`publish --wait` reads it; an entry that matched nothing is known as handled
        from the consumer group alone, so it costs no write of its own); a redelivered
        entry keeps the first delivery's account. Sent with the next read (read())."""
        self.acked.append(entry_id)
        if not outcome:
            return
        key = self.keys.entry_outcome(entry_id)

        def owed(pipe: redis.client.Pipeline) -> None:
            for name, value in {**outcome, "_done": "1"}.items():
                pipe.hsetnx(key, name, value)
            pipe.expire(key, ENTRY_OUTCOME_TTL_S)

        self.owed.append(owed)
