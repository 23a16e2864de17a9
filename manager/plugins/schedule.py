"""Timer triggers: `schedule:` (cron, five fields, or six with seconds first as Fission and
Quartz write them) or `every:` (an interval), in a time zone, with a payload and a
catch-up policy. Cron is parsed by croniter (pallets-eco: maintained, strict mode, time
zones, seconds); this module only names the field at fault and computes fire times."""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import re
import zoneinfo
from enum import StrEnum
from functools import cache, cached_property
from typing import Annotated, Any

from croniter import CroniterBadDateError, CroniterError, croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from manager.core.events import rfc3339

TIMER_TOPIC = "timer.v1"
TICK = "tick"
EVERY_RE = re.compile(r"^(\d{1,12})(s|m|h|d)$")
EVERY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The horizon (docs/plugins.md, Timer triggers): an interval is at most a year; a cron's
# next three fire times lie within ten years. Beyond, a timer is refused at load and by
# `validate`, so no fire time anyone computes can be out of range (year 273792670 was).
MAX_EVERY = "366d"
MAX_EVERY_S = 366 * 86400
CRON_HORIZON_S = 10 * 366 * 86400
# (name, lowest, highest) of each cron field; six fields put seconds first
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12),
          ("day-of-week", 0, 7))
SECONDS = ("second", 0, 59)


class CatchUp(StrEnum):
    """Ticks missed while no manager ran: `last` fires one event for the most recent
    (never a burst), `none` fires nothing late."""

    NONE = "none"
    LAST = "last"


def parse_every(value: str) -> int:
    """'30s', '5m', '1h', '1d' -> seconds."""
    match = EVERY_RE.fullmatch(value.strip())
    if not match or int(match[1]) == 0:
        raise ValueError(f"every {value[:40]!r}: write a whole number and a unit, s, m, h "
                         "or d (30s, 5m, 1h), above zero")
    seconds = int(match[1]) * EVERY_UNITS[match[2]]
    if seconds > MAX_EVERY_S:
        raise ValueError(f"every {value!r} is longer than {MAX_EVERY}, the longest interval "
                         "a timer takes; for a rarer timer write a cron schedule")
    return seconds


def check_cron(spec: str) -> None:
    """Raises ValueError naming the field at fault and its range, in croniter's strict mode."""
    if spec.startswith("@"):
        if not croniter.is_valid(spec, strict=True):
            raise ValueError(f"{spec!r} is not a cron macro (@hourly, @daily, @weekly, "
                             "@monthly, @yearly)")
        return
    parts = spec.split()
    if len(parts) not in (5, 6):
        raise ValueError(f"{spec!r} has {len(parts)} fields: cron has five (minute hour "
                         "day-of-month month day-of-week), or six with seconds first")
    names = (SECONDS, *FIELDS) if len(parts) == 6 else FIELDS
    for n, (part, (name, low, high)) in enumerate(zip(parts, names, strict=True)):
        probe = ["*"] * len(parts)
        probe[n] = part
        steps = [int(s) for s in re.findall(r"/(\d+)", part)]
        valid = croniter.is_valid(" ".join(probe), second_at_beginning=True, strict=True)
        if valid and not any(s > high for s in steps):
            continue
        if re.fullmatch(r"[\d*,/-]+", part):
            raise ValueError(f"`{part}` is out of range {low}-{high} in the {name} field")
        raise ValueError(f"`{part}` is not valid in the {name} field: numbers {low}-{high}, "
                         "`*`, ranges `a-b`, lists `a,b` and steps `*/n`")
    try:
        croniter.expand(spec, second_at_beginning=True, strict=True)
    except CroniterError as exc:
        raise ValueError(f"{spec!r}: {exc}") from None


@cache
def zone(name: str) -> zoneinfo.ZoneInfo:
    """A time zone by its IANA name; an unknown one gets the nearest names."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        close = difflib.get_close_matches(name, sorted(zoneinfo.available_timezones()), n=3)
        hint = f"; did you mean: {', '.join(close)}?" if close else " (like UTC, Europe/Paris)"
        raise ValueError(f"unknown time zone {name!r}{hint}") from None


class Schedule(BaseModel):
    """A trigger on a clock: exactly one of `schedule` (cron) and `every` (an interval)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    schedule: str | None = None
    every: str | None = None
    timezone: str = "UTC"
    catch_up: CatchUp = CatchUp.LAST
    payload: Annotated[dict[str, Any], Field(default_factory=dict)]

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        """Kept as checked: without the spaces around it."""
        if value is not None:
            value = value.strip()
            check_cron(value)
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        if value is not None:
            parse_every(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        zone(value)
        return value

    @model_validator(mode="after")
    def _one_clock(self) -> Schedule:
        if (self.schedule is None) == (self.every is None):
            raise ValueError("a timer trigger has `schedule` (cron) or `every` (like 30s), "
                             "one of the two")
        if self.schedule is not None:
            now = dt.datetime.now(dt.UTC).timestamp()
            try:
                last = self.next_times(now, 3)[-1]
            except (CroniterBadDateError, ValueError, OverflowError):
                raise ValueError(f"schedule {self.schedule!r} never fires") from None
            if last - now > CRON_HORIZON_S:
                raise ValueError(f"schedule {self.schedule!r} fires less than three times in "
                                 "ten years, the horizon a timer takes")
        return self

    @property
    def spec(self) -> str:
        """How people write it: the cron line, or `every 30s`."""
        return self.schedule if self.schedule is not None else f"every {self.every}"

    @cached_property
    def key(self) -> str:
        """Its clock's identity: what decides when it fires (not its payload or catch-up
        policy). A changed clock is a new timer, which starts at its next tick."""
        clock = json.dumps([self.schedule, self.every, self.timezone])
        return hashlib.sha256(clock.encode()).hexdigest()[:12]

    def timer(self, plugin: str) -> str:
        """This clock of this plugin, as the registry and the manager's timers name it."""
        return f"{plugin}:{self.key}"

    def _cron_from(self, ts: float) -> croniter:
        assert self.schedule is not None
        return croniter(self.schedule, dt.datetime.fromtimestamp(ts, zone(self.timezone)),
                        second_at_beginning=True)

    def due(self, now: float) -> float:
        """The latest scheduled time at or before `now` (epoch seconds)."""
        if self.every is not None:
            period = parse_every(self.every)
            return float(int(now // period) * period)
        return self._cron_from(now + 1e-6).get_prev(float)

    def previous(self, due: float) -> float:
        """The scheduled time before `due` (one of them)."""
        if self.every is not None:
            return due - parse_every(self.every)
        return self._cron_from(due).get_prev(float)

    def next_times(self, now: float, count: int) -> list[float]:
        """The next `count` scheduled times after `now`."""
        if self.every is not None:
            period = parse_every(self.every)
            first = self.due(now) + period
            return [first + n * period for n in range(count)]
        it = self._cron_from(now)
        return [it.get_next(float) for _ in range(count)]

    def between(self, after: float, before: float, cap: int = 1000) -> int:
        """How many scheduled times lie strictly between two of them (at most `cap`)."""
        if self.every is not None:
            return max(0, min(cap, int((before - after) // parse_every(self.every)) - 1))
        it = self._cron_from(after)
        count = 0
        while count < cap and it.get_next(float) < before:
            count += 1
        return count

    def view(self, now: float, count: int = 3) -> dict[str, Any]:
        """What `list` and GET /plugins show: the trigger and its next fire times."""
        try:
            upcoming = [rfc3339(t) for t in self.next_times(now, count)]
        except (ValueError, OverflowError):  # a timer kept from before the horizon was
            upcoming = []                   # checked: its row shows no times, not a 500
        return {**self.model_dump(mode="json", exclude_none=True), "key": self.key,
                "next": upcoming}


def schedule_of(spec: str, timezone: str = "UTC") -> Schedule:
    """A spec as people type it (`*/5 * * * *` or `30s`) -> its Schedule."""
    spec = spec.strip()
    if EVERY_RE.fullmatch(spec):
        return Schedule(every=spec, timezone=timezone)
    return Schedule(schedule=spec, timezone=timezone)
