#!/usr/bin/env python3
"""`make soak`: many events across 3 plugins and two workers, with a worker killed
(SIGKILL) and restarted twice, and Redis itself SIGKILLed once and started again on the
same port and AOF directory, while they run. Every (event, matching plugin) must end with
exactly one terminal record and one result event. Prints the tally; exits non-zero if
anything was lost or duplicated."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import (  # noqa: E402
    RedisServer,
    WorkerProcess,
    private_settings,
    session_dir,
    wired,
)
from manager.bus.dispatch import Dispatcher  # noqa: E402
from manager.bus.listener import Listener  # noqa: E402
from manager.bus.sweeper import Sweeper  # noqa: E402
from manager.core.clients import redis_client  # noqa: E402
from manager.core.contract import make_celery  # noqa: E402
from manager.core.record_store import RecordStore  # noqa: E402
from manager.core.records import Status  # noqa: E402
from manager.plugins.registry import Registry  # noqa: E402
from redis_nodes import SentinelCluster  # noqa: E402

PLUGINS = ROOT / "bench" / "soak_plugins"
MATCHES = {"x": ("soak_a", "soak_b"), "y": ("soak_a", "soak_c")}


def terminal_pairs(store: RecordStore) -> Counter:
    """(event_id, plugin) -> number of terminal records (two fields per record: the soak
    must not load the machine it measures)."""
    counts: Counter = Counter()
    for plugin in ("soak_a", "soak_b", "soak_c"):
        ids = store.conn.zrange(store.keys.plugin_invocations(plugin), 0, -1)
        pipe = store.conn.pipeline(transaction=False)
        for inv in ids:
            pipe.hmget(store.keys.invocation(inv.decode()), "status", "event_id")
        for status, event_id in pipe.execute():
            if status and Status(json.loads(status)).terminal:
                counts[(json.loads(event_id), plugin)] += 1
    return counts


def result_pairs(conn: redis.Redis, stream: str) -> Counter:
    counts: Counter = Counter()
    for _, fields in conn.xrange(stream):
        event = json.loads(fields[b"event"])
        if event.get("event_type") == "done":
            plugin = event["source"].split(":", 1)[1].split("@")[0]
            counts[(event["causation_id"], plugin)] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    parser.add_argument("--ha", action="store_true", help="Redis with two replicas and three "
                        "Sentinels over TLS; the primary is SIGKILLed (a replica promoted) "
                        "instead of Redis being restarted")
    args = parser.parse_args()
    soak = {"visibility_timeout": 10, "restore_interval": 2, "reclaim_idle_ms": 5000,
            "housekeeping_s": 2, "sweep_grace_s": 10, "stream_maxlen": 1_000_000}
    run_dir = Path(tempfile.mkdtemp(prefix="titan-soak-"))
    if args.ha:
        cluster = SentinelCluster()
        settings = cluster.settings(PLUGINS, run_dir, **soak)
        server = None
    else:
        server = RedisServer(persist=True)
        settings = private_settings(server.url, PLUGINS, run_dir, **soak)
    conn = redis_client(settings.redis)
    Registry(wired(conn, settings)).reload()
    listener_conn = redis_client(settings.redis)
    dispatcher = Dispatcher(wired(conn, settings), make_celery(settings.broker))
    listening = wired(listener_conn, settings)
    listener = Listener(listening, Registry(listening), dispatcher,
                        housekeeping=Sweeper(listening, dispatcher).maybe_sweep)
    workers = [WorkerProcess(settings, f"soak{i}", concurrency=1) for i in (1, 2)]
    store = wired(conn, settings).records
    expected = {(f"soak-{n}", p) for n in range(args.events)
                for p in MATCHES["x" if n % 2 else "y"]}
    try:
        for w in workers:
            w.wait_ready(conn)
        threading.Thread(target=listener.run, daemon=True).start()
        t0 = time.monotonic()
        for n in range(args.events):
            conn.xadd(settings.event_stream, {"event": json.dumps(
                {"event_id": f"soak-{n}", "topic": "soak.v1",
                 "event_type": "x" if n % 2 else "y"})})
        print(f"published {args.events} events ({len(expected)} runs expected)")
        kills = [len(expected) // 4, len(expected) * 3 // 5]
        redis_crash = len(expected) * 2 // 5
        done = 0
        while time.monotonic() - t0 < args.timeout:
            try:
                done = sum(1 for pair in terminal_pairs(store) if pair in expected)
            except redis.ConnectionError:
                time.sleep(1)
                continue
            if redis_crash and done >= redis_crash:
                redis_crash = 0
                if server is None:
                    cluster.fail_over()  # and nobody starts the old primary again
                    print(f"  killed the Redis primary (SIGKILL) at {done} runs done; a "
                          "replica was promoted; the other confirms its writes")
                else:
                    server.crash()
                    print(f"  killed Redis (SIGKILL) at {done} runs done; starting it again")
                    time.sleep(1)
                    server.start()
            if kills and done >= kills[0]:
                kills.pop(0)
                victim = workers[0]
                os.killpg(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait(10)
                print(f"  killed {victim.name} (SIGKILL) at {done} runs done; restarting it")
                workers[0] = WorkerProcess(settings, victim.name, concurrency=1)
                workers[0].wait_ready(conn)
            if done >= len(expected):
                break
            time.sleep(10)
        elapsed = time.monotonic() - t0
        time.sleep(3)  # let the last result events land
        terminal, results = terminal_pairs(store), result_pairs(conn, settings.event_stream)
        chained = sum(len(store.for_plugin(p, 1_000_000)) for p in ("soak_a", "soak_b", "soak_c"))
        outcomes = {(r.event_id, r.plugin): (r.status.value, r.reason)
                    for p in ("soak_a", "soak_b", "soak_c")
                    for r in store.for_plugin(p, 1_000_000)
                    if (r.event_id, r.plugin) in expected and r.status.value != "succeeded"}
    finally:
        listener.stop()
        for w in workers:
            w.stop()
        if server is None:
            cluster.close()
        else:
            server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(session_dir(), ignore_errors=True)
    statuses: Counter = Counter()
    lost = [p for p in expected if terminal[p] == 0]
    duplicated = [p for p in expected if terminal[p] > 1 or results[p] > 1]
    succeeded = sum(1 for p in expected if terminal[p] == 1 and results[p] == 1)
    failed = len(expected) - succeeded - len(lost) - len(duplicated)
    statuses.update(expected=len(expected), succeeded=succeeded, failed=failed, lost=len(lost),
                    duplicated=len(duplicated))
    print(f"soak: {elapsed:.0f}s, {len(expected) / elapsed:.1f} runs/s "
          f"({chained} runs recorded: results trigger soak_a again, up to the hops limit)")
    print("  " + "  ".join(f"{k} {statuses[k]}" for k in
                           ("expected", "succeeded", "failed", "lost", "duplicated")))
    for label, pairs in (("lost", lost), ("duplicated", duplicated)):
        if pairs:
            print(f"  {label} (first 10): {sorted(pairs)[:10]}")
    for pair, (status, reason) in sorted(outcomes.items())[:10]:
        print(f"  not succeeded: {pair}: {status}: {reason} ({results[pair]} result events)")
    return 1 if lost or duplicated else 0


if __name__ == "__main__":
    sys.exit(main())
