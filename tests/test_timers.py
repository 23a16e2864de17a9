"""Timer triggers: a schedule in plugin.yaml fires one ordinary event per tick on the bus,
exactly once, with two managers, through a SIGKILL and a restart, through a Sentinel
failover, across reloads and rollbacks; refused at load naming the field at fault."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import redis

from harness import (
    free_port,
    new_id,
    records_of,
    settings_env,
    wait_until,
    wired,
)
from manager.bus.timers import TickOutcome, Timers
from manager.core.config import ROOT, Settings
from manager.core.errors import ManifestError
from manager.plugins.manifest import parse_manifest
from manager.plugins.registry import Registry
from manager.plugins.schedule import CatchUp, Schedule, schedule_of
from redis_nodes import SentinelCluster

TEST_PLUGINS = Path(__file__).parent / "plugins"
BASE = "name: t\nversion: 1.0.0\nentrypoint: python main.py\nimage: x\ntriggers:\n"


def timed_plugin(plugins: Path, trigger: str, name: str = "ticker",
                 version: str = "1.0.0") -> Path:
    """The echo plugin (it publishes test.v1/pong) on a timer."""
    target = plugins / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(TEST_PLUGINS / "echo", target)
    (target / "plugin.yaml").write_text(
        f"name: {name}\nversion: {version}\nentrypoint: python main.py\n"
        f"image: titan-runtime:py3.11\ntriggers:\n  - {trigger}\n")
    return target


def own(settings: Settings, plugins: Path, **extra: object) -> Settings:
    uid = new_id("tm")
    return settings.with_(plugins_dir=plugins, key_prefix=f"{settings.key_prefix}{uid}",
                          event_stream=f"{settings.event_stream}.{uid}",
                          task_queue=f"{settings.task_queue}.{uid}", **extra)


def ticks(conn: redis.Redis, settings: Settings) -> list[dict]:
    """The tick events on the stream, oldest first, with their payloads."""
    found = []
    for _, fields in conn.xrange(settings.event_stream):
        if b'"timer.v1"' not in fields[b"event"]:
            continue  # others' events, some hostile (too deep for json) in the session's
        event = json.loads(fields[b"event"])
        if event["topic"] == "timer.v1":
            found.append(event)
    return found


def scheduled(events: list[dict]) -> list[str]:
    return [e["payload"]["scheduled_at"] for e in events]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- at load ---------------------------------------------------------------------------

@pytest.mark.parametrize(("trigger", "says"), [
    ('schedule: "*/61 * * * *"', "triggers.0.schedule: `*/61` is out of range 0-59 in the "
                                 "minute field"),
    ('schedule: "0 25 * * *"', "`25` is out of range 0-23 in the hour field"),
    ('schedule: "0 0 * * * * *"', "has 7 fields: cron has five"),
    ('schedule: "0 0 30 2 *"', "can never occur in month(s) [2]"),
    ("every: 30x", "triggers.0.every: every '30x': write a whole number and a unit"),
    ("every: 5m\n    schedule: '* * * * *'", "`schedule` (cron) or `every` (like 30s), one of"),
    ("every: 5m\n    timezone: Europe/Pariss", "did you mean: Europe/Paris"),
    ("every: 5m\n    catch_up: all", "triggers.0.catch_up: Input should be 'none' or 'last'"),
    ("every: 5m\n    evrey: 2", "did you mean 'every'?"),
    ("every: 99999999999d", "every '99999999999d' is longer than 366d"),
    ("every: 367d", "longer than 366d, the longest interval a timer takes"),
])
def test_a_bad_timer_is_refused_at_load_naming_the_field(trigger: str, says: str) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_manifest(f"{BASE}  - {trigger}\n".encode(), "p/plugin.yaml", 65536)
    (error,) = refused.value.errors
    assert re.match(r"p/plugin\.yaml:[67]:5: ", error) and says in error, error


def test_fire_times_in_a_time_zone_and_on_an_interval() -> None:
    paris = schedule_of("0 9 * * mon-fri", "Europe/Paris")
    friday = 1796371200.0  # 2026-12-04 (a Friday) 08:00 UTC, 09:00 in Paris
    assert paris.due(friday) == friday and paris.due(friday - 1) < friday - 86400 + 1
    assert paris.next_times(friday, 2) == [friday + 3 * 86400, friday + 4 * 86400]
    seconds = schedule_of("*/10 * * * * *")  # six fields: seconds first
    assert seconds.next_times(friday + 1, 2) == [friday + 10, friday + 20]
    every = schedule_of("30s")
    assert every.due(friday + 29.9) == friday and every.between(friday, friday + 150) == 4
    assert schedule_of("5m").key != schedule_of("300s").key  # the spec, as written
    assert Schedule(every="5m", payload={"a": 1}).key == Schedule(every="5m").key


def test_a_timer_past_the_horizon_never_raises_where_it_is_shown() -> None:
    """The preview refuses it as a bad parameter; a timer stored before the horizon was
    checked shows no fire times rather than failing the plugin list."""
    from click.testing import CliRunner

    from manager.cli.main import cli
    shown = CliRunner().invoke(cli, ["schedule", "99999999999d"])
    assert shown.exit_code == 2 and "longer than 366d" in shown.output, shown.output
    assert shown.exception is None or isinstance(shown.exception, SystemExit)
    assert CliRunner().invoke(cli, ["schedule", "366d", "--next", "1000"]).exit_code == 0
    kept = Schedule.model_construct(every="99999999999d", timezone="UTC")
    assert kept.view(time.time())["next"] == []


# -- with Redis and a clock of the test's ------------------------------------------------

@pytest.fixture
def timed(settings: Settings, conn: redis.Redis, tmp_path: Path) -> Iterator[Settings]:
    mine = own(settings, tmp_path / "plugins")
    yield mine
    for key in conn.scan_iter(f"{mine.key_prefix}:*"):
        conn.delete(key)
    conn.delete(mine.event_stream)


def test_two_managers_fire_each_tick_once(timed: Settings, conn: redis.Redis) -> None:
    timed_plugin(timed.plugins_dir, "every: 1s")
    clock = Clock(time.time())
    Registry(wired(conn, timed), clock).reload()
    one = Timers(wired(redis.Redis.from_url(timed.redis_url), timed),
                 Registry(wired(conn, timed)), clock)
    two = Timers(wired(redis.Redis.from_url(timed.redis_url), timed),
                 Registry(wired(conn, timed)), clock)
    outcomes: Counter[str] = Counter()
    for _ in range(12):
        clock.now += 1
        for timers in (two, one) if int(clock.now) % 2 else (one, two):
            outcomes.update(t.outcome.value for t in timers.run_once())
    times = scheduled(ticks(conn, timed))
    assert len(times) == 12 and len(set(times)) == 12, times
    assert outcomes == {"fired": 12, "seen": 12}


@pytest.mark.parametrize(("policy", "late"), [("last", 1), ("none", 0)])
def test_missed_ticks_catch_up_once_or_never(timed: Settings, conn: redis.Redis,
                                             policy: str, late: int) -> None:
    timed_plugin(timed.plugins_dir, f"every: 1s\n    catch_up: {policy}")
    clock = Clock(time.time())
    registry = Registry(wired(conn, timed), clock)
    registry.reload()
    timers = Timers(wired(conn, timed), registry, clock)
    for _ in range(3):
        clock.now += 1
        timers.run_once()
    clock.now += 6  # everything was down for five ticks; the sixth is due now
    after = Timers(wired(conn, timed), Registry(wired(conn, timed)), clock)  # a new process
    caught = [t.outcome for t in after.run_once()]
    assert caught == [TickOutcome.LATE] * late + [TickOutcome.FIRED]
    clock.now += 1
    assert [t.outcome for t in after.run_once()] == [TickOutcome.FIRED]
    events = ticks(conn, timed)
    times = scheduled(events)
    assert len(times) == 3 + late + 2 and len(set(times)) == len(times), times
    assert [e["payload"]["late"] for e in events[3:]] == [True] * late + [False, False]
    if late:  # the most recent missed tick: the one just before the tick due now
        assert epoch(times[4]) - epoch(times[3]) == 1


def test_one_plugins_broken_timer_costs_no_other_plugin_its_ticks(
        timed: Settings, conn: redis.Redis) -> None:
    """A plugin stored by an older manager with a timer past today's horizon reads as
    invalid, naming the field; the plugins listed after it keep every tick, and the
    listing answers for all of them."""
    for name in ("aa", "bb"):
        timed_plugin(timed.plugins_dir, "every: 1s", name=name)
    clock = Clock(time.time())
    registry = Registry(wired(conn, timed), clock)
    registry.reload()
    stored = json.loads(conn.hget(timed.keys.registry, "aa"))
    stored["manifest"]["triggers"] = [{"every": "99999999999d"}]
    conn.hset(timed.keys.registry, "aa", json.dumps(stored))
    conn.incr(timed.keys.registry_version)
    entries = Registry(wired(conn, timed)).entries()
    assert entries["aa"].status.value == "invalid" and not entries["aa"].runnable
    assert any("every" in e and "longer than 366d" in e for e in entries["aa"].errors), \
        entries["aa"].errors
    assert sorted(e.public()["name"] for e in entries.values()) == ["aa", "bb"]
    timers = Timers(wired(conn, timed), Registry(wired(conn, timed)), clock)
    serving = Timers(wired(conn, timed), ServingBroken(wired(conn, timed)), clock)
    fired = []
    for _ in range(3):
        clock.now += 1
        fired += [t.plugin for t in timers.run_once()]
        clock.now += 1
        fired += [t.plugin for t in serving.run_once()]  # even while "aa" serves it
    assert fired == ["bb"] * 6


class ServingBroken(Registry):
    """A registry in which "aa" serves with a timer past the horizon, as a manager before
    the horizon was checked would have loaded it."""

    def entries(self, fresh: bool = False, version: int | None = None) -> dict:
        found = super().entries(fresh, version)
        bb = found["bb"]
        broken = Schedule.model_construct(every="99999999999d", timezone="UTC",
                                          catch_up=CatchUp.LAST, payload={})
        assert bb.manifest is not None
        return {"aa": replace(bb, name="aa", manifest=bb.manifest.model_copy(
            update={"triggers": [broken]})), "bb": bb}


def test_reload_and_rollback_change_schedules_at_once(timed: Settings,
                                                      conn: redis.Redis) -> None:
    timed_plugin(timed.plugins_dir, "every: 1s")
    clock = Clock(time.time())
    registry = Registry(wired(conn, timed), clock)
    registry.reload()
    timers = Timers(wired(conn, timed), registry, clock)

    def step(seconds: int) -> list[tuple[str, float, TickOutcome]]:
        fired = []
        for _ in range(seconds):
            clock.now += 1
            fired += [(t.timer, t.due, t.outcome) for t in timers.run_once()]
        return fired

    first = step(3)
    old_key = first[0][0]
    assert [o for _, _, o in first] == [TickOutcome.FIRED] * 3
    (shown,) = registry.get("ticker").public()["triggers"]  # GET /plugins/ticker
    assert shown["every"] == "1s" and shown["key"] == old_key and len(shown["next"]) == 3
    timed_plugin(timed.plugins_dir, "every: 2s", version="2.0.0")
    assert registry.reload()["updated"]
    changed_at = clock.now
    second = step(4)
    every2 = schedule_of("2s")
    assert {k for k, _, _ in second} == {every2.key}  # the old clock fires no more
    # the new one from its next tick: what was due before the change is not fired
    assert [(d, o) for _, d, o in second if o is not TickOutcome.SEEN] == [
        (d, TickOutcome.FIRED) for d in sorted({every2.due(changed_at + n)
                                                for n in range(1, 5)}) if d >= changed_at]
    registry.rollback("ticker")  # 1.0.0's schedule again, from its next tick: no catch-up
    third = step(3)
    assert [(k, o) for k, _, o in third] == [(old_key, TickOutcome.FIRED)] * 3
    shutil.rmtree(timed.plugins_dir / "ticker")
    registry.reload()  # removed: no more ticks
    assert step(3) == []


# -- the real thing ----------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.usefixtures("worker")
def test_every_second_fires_ten_ticks_as_ten_runs(settings: Settings, conn: redis.Redis,
                                                  listener, tmp_path: Path) -> None:
    """In the session's stack: ten consecutive ticks, ten runs, each its own event."""
    timed_plugin(settings.plugins_dir, "every: 1s\n    payload: {job: disk}", name="ticker")
    registry = Registry(wired(conn, settings))
    registry.reload()
    timers = Timers(wired(conn, settings), registry)
    thread = threading.Thread(target=timers.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(records_of(conn, settings, "ticker", limit=50)) >= 11, 60,
                   "eleven tick runs")
    finally:
        timers.stop()
        thread.join(5)
        shutil.rmtree(settings.plugins_dir / "ticker")
        registry.reload()
    mine = [e for e in ticks(conn, settings) if e["payload"]["plugin"] == "ticker"]
    times = [e["payload"]["scheduled_at"] for e in mine]
    assert len(set(times)) == len(times) >= 11
    stamps = [epoch(t) for t in times]
    assert all(b - a == 1 for a, b in itertools.pairwise(stamps[:11])), times
    assert all(e["payload"]["job"] == "disk" and e["source"] == "timer" for e in mine)
    wait_until(lambda: sum(r["status"] == "succeeded" for r in records_of(
        conn, settings, "ticker", limit=50)) >= 10, 60, "ten succeeded runs")
    runs = records_of(conn, settings, "ticker", limit=50)
    assert len({r["event_id"] for r in runs}) == len(runs), "a tick ran twice"


def manager_process(settings: Settings, tmp_path: Path, name: str) -> subprocess.Popen:
    run = tmp_path / name
    run.mkdir(mode=0o700, exist_ok=True)
    env = {**settings_env(settings), "TITAN_API_PORT": str(free_port()),
           "TITAN_METRICS_PORT": str(free_port()), "TITAN_API_TOKEN": "t0ken",
           "TITAN_RUN_DIR": str(run), "TITAN_API_SOCKET": str(run / "api.sock")}
    log = (tmp_path / f"{name}.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "manager"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_two_manager_processes_fire_each_tick_once(timed: Settings, conn: redis.Redis,
                                                   tmp_path: Path) -> None:
    timed_plugin(timed.plugins_dir, "every: 1s")
    managers = [manager_process(timed, tmp_path, f"m{n}") for n in (1, 2)]
    try:
        wait_until(lambda: len(ticks(conn, timed)) >= 8, 60, "eight ticks")
    finally:
        for proc in managers:
            stop(proc)
    times = scheduled(ticks(conn, timed))
    assert len(set(times)) == len(times), Counter(times).most_common(3)
    assert all(proc.returncode == 0 for proc in managers)


@pytest.mark.integration
@pytest.mark.parametrize(("policy", "late"), [("last", 1), ("none", 0)])
def test_a_manager_killed_and_restarted_catches_up_by_its_policy(
        timed: Settings, conn: redis.Redis, tmp_path: Path, policy: str, late: int) -> None:
    timed_plugin(timed.plugins_dir, f"every: 1s\n    catch_up: {policy}")
    proc = manager_process(timed, tmp_path, "m")
    try:
        wait_until(lambda: len(ticks(conn, timed)) >= 3, 60, "three ticks")
        proc.kill()  # SIGKILL, mid-schedule
        proc.wait()
        before = len(ticks(conn, timed))
        time.sleep(5.5)  # five ticks' time with no manager
        proc = manager_process(timed, tmp_path, "m")
        wait_until(lambda: len(ticks(conn, timed)) >= before + 3, 60, "ticks after the restart")
    finally:
        stop(proc)
    events = ticks(conn, timed)
    times = scheduled(events)
    assert len(set(times)) == len(times), Counter(times).most_common(3)
    after = events[before:]
    resumed = next(e for e in after if not e["payload"]["late"])  # the first on time
    # what was fired for the time nobody ran: the catch-up (a later pass that a loaded
    # machine delays past a tick may catch up again, and is not this test's question)
    caught = [e for e in after if epoch(e["payload"]["scheduled_at"])
              < epoch(resumed["payload"]["scheduled_at"])]
    assert [e["payload"]["late"] for e in caught] == [True] * late, caught
    if late:  # the most recent missed tick: the one just before the first due after it
        assert epoch(resumed["payload"]["scheduled_at"]) - epoch(
            caught[0]["payload"]["scheduled_at"]) == 1


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def lateness(event: dict) -> float:
    return epoch(event["payload"]["fired_at"]) - epoch(event["payload"]["scheduled_at"])


@pytest.mark.integration
def test_a_sentinel_failover_loses_and_doubles_no_tick(tmp_path: Path) -> None:
    """Ticks every 4 s, the primary SIGKILLed between two: every scheduled time from the
    first to the last is on the new primary's stream exactly once."""
    cluster = SentinelCluster()
    try:
        s = cluster.settings(tmp_path / "plugins", tmp_path / "run")
        timed_plugin(s.plugins_dir, "every: 4s")
        proc = manager_process(s, tmp_path, "m")
        try:
            conn = cluster.primary.client()
            wait_until(lambda: len(ticks(conn, s)) >= 2, 60, "two ticks")
            cluster.fail_over()
            conn = cluster.primary.client()
            wait_until(lambda: len(ticks(conn, s)) >= 5, 90, "ticks on the new primary")
        finally:
            stop(proc)
        stamps = sorted(int(epoch(t)) for t in scheduled(ticks(conn, s)))
        assert len(set(stamps)) == len(stamps), stamps
        assert [b - a for a, b in itertools.pairwise(stamps)] == [4] * (len(stamps) - 1), stamps
    finally:
        cluster.close()
