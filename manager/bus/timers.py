"""Timer triggers fire here: on each pass, every runnable plugin's schedule whose latest
scheduled time has not been handled yet gets its tick, an ordinary event on the bus
(topic timer.v1, type tick), through one Lua script that records the tick and adds its
event in one step. So whichever manager gets there first fires it, and only once; the
tick's event id derives from the plugin, the timer and the scheduled time, so the
listener's idempotency key would stop a second run even then."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis

from manager.core.clients import check_replicated, confirm_replicated
from manager.core.errors import NotReplicated
from manager.core.events import Event, now_rfc3339, rfc3339
from manager.core.observer import observer
from manager.core.scripts import Scripts, named
from manager.core.wiring import Wiring
from manager.plugins.registry import Registry
from manager.plugins.schedule import TICK, TIMER_TOPIC, Schedule

log = logging.getLogger(__name__)


class TickOutcome(StrEnum):
    FIRED = "fired"  # on time
    LATE = "late"  # a catch-up: its time was missed, and catch_up: last fires it
    SKIPPED = "skipped"  # missed and not fired (catch_up: none, or older than the last)
    SEEN = "seen"  # handled already (another manager), or before the timer was in service


@dataclass(frozen=True)
class Tick:
    plugin: str
    timer: str
    due: float
    outcome: TickOutcome


def tick_event(plugin: str, schedule: Schedule, due: float, now: float,
               late: bool) -> Event:
    """The event of one tick: its id derives from the plugin, the timer and the time;
    `late` marks a tick fired after its time was missed (a catch-up)."""
    return Event(event_id=f"tick.{plugin}.{schedule.key}.{int(due)}", topic=TIMER_TOPIC,
                 event_type=TICK, source="timer", time=now_rfc3339(),
                 payload={**schedule.payload, "plugin": plugin, "timer": schedule.key,
                          "schedule": schedule.spec, "scheduled_at": rfc3339(due),
                          "fired_at": rfc3339(now), "late": late})


class Timers:
    """The manager's clock: `run` passes every `timer_pass_s` until stopped."""

    def __init__(self, wiring: Wiring, registry: Registry,
                 clock: Callable[[], float] = time.time) -> None:
        self.wiring = wiring
        self.settings = wiring.settings.timers
        self.redis = wiring.settings.redis
        self.registry = registry
        self.clock = clock
        self.scripts = Scripts(wiring.conn)
        self.handled: dict[str, float] = {}  # timer -> the last due time this process settled
        self.next_due: float | None = None  # the soonest tick after the last pass
        self.stopping = threading.Event()

    def run(self) -> None:
        """Passes until stopped. Nothing ends the thread but stop(): a failed pass is
        logged and the next one tries the same ticks again (none was recorded)."""
        while not self.stopping.wait(self.pause()):
            try:
                self.run_once()
            except redis.RedisError as exc:  # down, failing over, read-only for a moment
                log.warning("timers: Redis refused a pass (%s); the tick is tried again", exc)
            except Exception:
                log.exception("timers: a pass failed; the tick is tried again")

    def stop(self) -> None:
        self.stopping.set()

    def pause(self) -> float:
        """Until the next pass: `timer_pass_s`, or less when a tick falls due sooner, so a
        tick goes out within milliseconds of its time (the registry is read on each pass,
        so a reload is seen within `timer_pass_s`)."""
        wait = self.settings.pass_s
        if self.next_due is not None:
            wait = min(wait, self.next_due - self.clock() + 0.001)
        return max(0.0, wait)

    def run_once(self) -> list[Tick]:
        """Every due tick of every runnable plugin, handled once by this process. Each
        plugin's timers are a pass of their own: whatever one plugin's timer raises is
        logged and costs no other plugin its ticks (a Redis error ends the pass)."""
        now = self.clock()
        ticks: list[Tick] = []
        self.next_due = None
        for entry in self.registry.entries().values():
            if not entry.runnable or entry.manifest is None:
                continue
            try:
                ticks += self.plugin_ticks(entry.name, entry.manifest.schedules, now)
            except redis.RedisError:
                raise
            except Exception:
                log.exception("timers of %s: their pass failed; other plugins' went on",
                              entry.name)
        return ticks

    def plugin_ticks(self, plugin: str, schedules: tuple[Schedule, ...],
                     now: float) -> list[Tick]:
        ticks: list[Tick] = []
        for schedule in schedules:
            timer = schedule.timer(plugin)
            try:
                due, (upcoming,) = schedule.due(now), schedule.next_times(now, 1)
            except (ValueError, OverflowError):  # no such time (one timer, not the pass)
                log.exception("timer %s of %s has no due time", schedule.spec, plugin)
                continue
            self.next_due = min(upcoming, self.next_due or upcoming)
            if self.handled.get(timer) == due:
                continue
            handled = self.consider(plugin, schedule, due, now)
            if handled is not None:
                self.handled[timer] = due
                ticks += handled
        return ticks

    def consider(self, plugin: str, schedule: Schedule, due: float,
                 now: float) -> list[Tick] | None:
        """Fires (or skips) the due tick, and with catch_up last the missed one before it,
        through the script; None when it is to be tried again (no replica confirmed it)."""
        late = now - due > self.settings.grace_s
        prev = schedule.previous(due)
        keys = self.wiring.keys
        pipe = self.wiring.conn.pipeline(transaction=False)
        self.scripts.tick(
            keys=[keys.timer_fired, keys.timer_since, self.settings.stream],
            args=[named(timer=schedule.timer(plugin), due=due, prev=prev, since=now,
                        late=late, catch_up=schedule.catch_up.value,
                        maxlen=self.settings.stream_maxlen,
                        event=tick_event(plugin, schedule, due, now, late).encode(),
                        prev_event=tick_event(plugin, schedule, prev, now, True).encode())],
            client=pipe)
        confirm_replicated(pipe, self.redis)
        try:
            (reply,) = check_replicated(pipe.execute(), self.redis,
                                        f"the tick of {plugin}")
        except NotReplicated as exc:
            log.warning("timers: %s", exc.message)
            return None
        outcome, last, caught = TickOutcome(reply[0].decode()), float(reply[1]), int(reply[2])
        if outcome is TickOutcome.FIRED and late:
            outcome = TickOutcome.LATE
        ticks = [Tick(plugin, schedule.key, prev, TickOutcome.LATE)] if caught else []
        ticks.append(Tick(plugin, schedule.key, due, outcome))
        missed = schedule.between(last, due) - caught if last >= 0 else 0
        self.count(plugin, schedule, ticks, missed, now)
        return ticks

    @staticmethod
    def count(plugin: str, schedule: Schedule, ticks: list[Tick], missed: int,
              now: float) -> None:
        if missed > 0:
            observer().timer_ticked(plugin, TickOutcome.SKIPPED.value, count=missed)
        for tick in ticks:
            if tick.outcome is TickOutcome.SEEN:
                continue
            fired = tick.outcome is not TickOutcome.SKIPPED
            observer().timer_ticked(plugin, tick.outcome.value,
                                    late_s=now - tick.due if fired else None)
            if fired:
                log.info("timer %s of %s: tick %s %s", schedule.spec, plugin,
                         rfc3339(tick.due), tick.outcome.value)
