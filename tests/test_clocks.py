"""One clock: every lease, deadline, backoff and score in Redis is written and judged on
Redis's clock, so workers whose hosts' clocks differ (here: libfaketime, five minutes
ahead and five behind) neither re-queue a live run nor leave a run waiting. The worker on
the true clock is killed mid-burst: nothing is lost, nothing runs twice, and only the
runs it held are re-queued. (With Celery's ETAs a retry waited ten minutes in the behind
worker's memory: this test timed out.)"""

from __future__ import annotations

import glob
import os
import signal
import threading
import uuid

import pytest

from harness import WorkerProcess, caused_by, isolated, new_id, records_of, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.bus.sweeper import Sweeper
from manager.core.contract import make_celery
from manager.core.events import Event

pytestmark = pytest.mark.integration
ACTIVE = ("pending", "queued", "throttled", "running", "retrying")


def skewed(offset: str) -> dict[str, str]:
    """The environment of a process whose wall clock is `offset` off (libfaketime, which
    scripts/bootstrap.sh installs); its monotonic clock stays true."""
    (library,) = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    return {"LD_PRELOAD": library, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1"}


def test_workers_on_skewed_clocks_lose_double_and_requeue_nothing_live(
        settings, conn, caplog) -> None:
    tag = uuid.uuid4().hex[:6]
    # (kombu puts a killed worker's prefetched messages back after the visibility timeout,
    # judged by each worker's own clock: short here, as duplicates are harmless)
    # keys of its own: its sweeper judges only this test's runs (the session's keys hold
    # runs other tests' killed workers left behind)
    mine, registry = isolated(settings, conn, sweep_grace_s=2, visibility_timeout=30,
                              restore_interval=2)
    workers = {name: WorkerProcess(mine, f"clock{name}{tag}", concurrency=2, **env)
               for name, env in (("true", {}), ("ahead", skewed("+5m")),
                                 ("behind", skewed("-5m")))}
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    sweeper = Sweeper(wired(conn, mine), dispatcher)
    stop = threading.Event()

    def sweep() -> None:  # the manager's sweeper, once a second
        while not stop.wait(1):
            sweeper.sweep()

    thread = threading.Thread(target=sweep, daemon=True)
    try:
        for w in workers.values():
            w.wait_ready(conn)
        assert workers["ahead"].proc.poll() is None
        thread.start()
        events = [Event(new_id("clk"), "test.v1", "sleep", {"seconds": 2}) for _ in range(24)]
        ids = [dispatcher.dispatch(e, registry.get("sleeper"), "api")[0] for e in events]

        def mine_now() -> list[dict]:
            return [r for r in records_of(conn, mine, "sleeper", 500)
                    if r["invocation_id"] in ids]

        def held_by_the_true_one() -> list[str]:
            return [r["invocation_id"] for r in mine_now() if r["status"] == "running"
                    and r["worker"].startswith(f"clocktrue{tag}@")]

        wait_until(held_by_the_true_one, 60, "a run on the worker with the true clock")
        os.killpg(workers["true"].proc.pid, signal.SIGKILL)
        workers["true"].proc.wait(10)
        # what it held when it died (its second slot may have taken a run since the look
        # above): those records stay `running` on it until the sweeper judges them, a
        # lease later
        held = held_by_the_true_one()
        wait_until(lambda: all(r["status"] not in ACTIVE for r in mine_now())
                   and len(mine_now()) == len(ids), 240, "every run to end")
    finally:
        stop.set()
        for w in workers.values():
            w.stop()
    ended = {r["invocation_id"]: r for r in mine_now()}
    assert {r["status"] for r in ended.values()} == {"succeeded"}, ended
    for event in events:  # nothing lost, nothing twice
        assert [e["event_type"] for e in caused_by(conn, mine, event.event_id)] == ["slept"]
    # No live run was re-queued: a run the sweeper took from `running` was one the dead
    # worker held. (A waiting run whose message went with the dead worker, prefetched or
    # in its resender's hands, is sent again from its waiting status: nothing ran it, and
    # a message found twice runs once, as checked above.)
    taken_running = {r.args[0]: r.args[2] for r in caplog.records
                     if r.name == "manager.bus.sweeper"
                     and r.msg.startswith("sweeper: re-queued") and r.args[1] == "running"}
    assert all(worker.startswith(f"clocktrue{tag}@") for worker in taken_running.values()), \
        (taken_running, held)
    assert all(not r["worker"].startswith(f"clocktrue{tag}@") for r in ended.values()
               if r["invocation_id"] in held)  # the dead worker's runs ran elsewhere
    skews = {w: r["worker"].split("@")[0][5:-6] for w, r in ended.items()}
    assert {"ahead", "behind"} <= set(skews.values()), skews  # both skewed workers ran some
    for i, skew in skews.items():  # and their clocks were off (a run's start, by its host)
        lag = ended[i]["started_at"] - ended[i]["created_at"]
        assert lag > 200 if skew == "ahead" else lag < -200 if skew == "behind" else True, \
            (skew, lag)
