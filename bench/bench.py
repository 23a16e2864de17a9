#!/usr/bin/env python3
"""`make bench`: Titan end to end vs. the same container run directly, in the same run.

Latency: event XADDed -> result event read, sequentially, on the warm path (prewarmed
single-use containers) and on the cold path (a plugin with `prewarm: false`), each with
runc and with gVisor (`isolation: gvisor`), interleaved with a bare Docker SDK run
(create, start, wait, read output, remove) of the same image, command and limits; the
seed's file_watcher on a Markdown file, warm against its own cold runs; and what gVisor's
seccomp filter (--oci-seccomp) costs a bare gVisor run.
Throughput: bursts of events through two workers (warm path) vs. the same containers run
cold and directly by two threads at once, two of each, interleaved. Also reports the
memory one idle prewarmed container holds, and the Redis round trips of a warm run (every
process counted). Fairness: while a slow plugin has 12 runs queued on the two workers, how
long one event for another plugin waits in the queue, against the length of one slow run.
CLI: `list`, `logs` and `health` with the system's python3, beside curl of the same
answer. Scale: what grows with the plugins, 2, 100 and 1,000 of them (bench/scale.py), and
sustained warm runs/s with 1, 2 and 4 worker processes (bench/workers_scale.py).
The console: each page's time with 10,000 runs stored (bench/console.py).
Prints p50/p99, events/s and the ratios against targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bare import Bare  # noqa: E402  (bench/ is the script's directory)
from console import console_report, console_times  # noqa: E402
from egress import egress_case  # noqa: E402
from phases import Ledger, split  # noqa: E402
from probes import (  # noqa: E402
    cli_latency,
    counted_client,
    crowd,
    fairness,
    hit_rate,
    idle_memory,
    round_trips,
)
from report import BURSTS, report  # noqa: E402
from scale import listener_scale, scale_report  # noqa: E402
from tree import plugin_tree  # noqa: E402
from workers_scale import workers_report, workers_scale  # noqa: E402

from harness import (  # noqa: E402
    Bus,
    RedisServer,
    WorkerProcess,
    new_id,
    private_settings,
    session_dir,
    wired,
)
from manager.api.app import create_app  # noqa: E402
from manager.bus.dispatch import Dispatcher  # noqa: E402
from manager.bus.listener import Listener  # noqa: E402
from manager.core.contract import make_celery  # noqa: E402
from manager.plugins.registry import Registry  # noqa: E402
from manager.service import api_server  # noqa: E402

SETTLE_S = 0.6
GVISOR_SETTLE_S = 1.5  # between a warm run and the next measurement (its replacement starts)


def settle(seconds: float) -> Callable[[], None]:
    """A pause, so that what the step before started (a used container's removal, its
    replacement) is done before the next measurement: latency is measured at light load."""
    return lambda: time.sleep(seconds)


def burst(bus: Bus, n: int) -> float:
    """Publishes n events at once; time until every result is on the stream."""
    start = bus.conn.xinfo_stream(bus.settings.event_stream)["last-generated-id"]
    ids = {new_id("burst") for _ in range(n)}
    t0 = time.perf_counter()
    for event_id in ids:
        bus.publish({"event_id": event_id, "topic": "bench.v1", "event_type": "tick"})
    pending, last = set(ids), start
    while pending:
        for _, entries in bus.conn.xread({bus.settings.event_stream: last}, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                event = json.loads(fields[b"event"])
                pending.discard(event.get("causation_id"))
    return time.perf_counter() - t0


def direct_parallel(bare: Bare, n: int, concurrency: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: bare.run(), range(n)))
    return time.perf_counter() - t0


def measure(args: argparse.Namespace, bus: Bus, bares: dict[str, Bare], client, settings
            ) -> dict:
    md = {"path": str(args.markdown), "mime_type": "text/markdown"}
    ledger = Ledger()

    def e2e(kind: str, event_type: str, **kw: object) -> Callable[[], float]:
        return lambda: ledger.e2e(bus, kind, event_type, **kw)

    files = {"payload": md, "topic": "fs.v1", "expect": "file_text_extracted"}
    steps = {"settle_warm": settle(SETTLE_S), "warm": e2e("warm", "tick"),
             "settle_files": settle(SETTLE_S),
             "files_warm": e2e("files_warm", "file_created", **files),
             "settle_gvisor": settle(SETTLE_S),
             "gvisor_warm": e2e("gvisor_warm", "tick_gvisor"),
             "settle_net": settle(SETTLE_S),
             "egress_warm": e2e("egress_warm", "tick_net"),
             "settle": settle(GVISOR_SETTLE_S),  # gVisor's replacement starts slower
             "cold": e2e("cold", "tick_cold"),
             "gvisor_cold": e2e("gvisor_cold", "tick_gvisor_cold"),
             "files_cold": e2e("files_cold", "file_created_cold", **files),
             **{name: bare.run for name, bare in bares.items()}}
    for _ in range(4):  # warm-up: every worker process has run each plugin once (its pool)
        for name, step in steps.items():
            step()
            time.sleep(0 if name.startswith("settle") else SETTLE_S)
    ledger.forget()
    times: dict[str, list[float]] = {name: [] for name in steps
                                     if not name.startswith("settle")}
    for _ in range(args.runs):  # interleaved, so drift hits every side alike
        for name, step in steps.items():
            took = step()
            if took is not None:
                times[name].append(took)
    where = split(bus, ledger)
    memory = idle_memory(client, settings)
    trips = round_trips(bus.conn, args.runs // 2, e2e("trips", "tick"), SETTLE_S)
    return {"cli": cli_latency(args.api_socket), **times, "where": where, "round_trips": trips,
            "memory": memory, "hits": hit_rate(bus, args.runs), "fair": fairness(bus),
            "crowd": crowd(bus),
            **bursts(args, bus, bares["base"])}


def bursts(args: argparse.Namespace, bus: Bus, bare: Bare) -> dict[str, float]:
    """Titan's burst and the direct one, twice each, interleaved: the machine's drift over
    a minute hits both sides alike. Returns their total times."""
    times = {"t_titan": 0.0, "t_direct": 0.0}
    for _ in range(BURSTS):
        times["t_titan"] += burst(bus, args.burst)
        times["t_direct"] += direct_parallel(bare, args.burst, 2)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40, help="sequential runs per side")
    parser.add_argument("--burst", type=int, default=80, help="events in the throughput burst")
    parser.add_argument("--runs-only", action="store_true",
                        help="latency, throughput and the probes; not the scale tables nor "
                        "the console (about a third of the time)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:  # whatever fails, everything made is undone
        stack.callback(shutil.rmtree, session_dir(), True)
        m, extra = run_bench(args, stack)
    ok = report(args, m)
    if not args.runs_only:
        lines, scaled = scale_report(extra["scale"])
        print("\n".join(lines + workers_report(extra["sustain"])))
        lines, fast_pages = console_report(extra["pages"])
        print("\n".join(lines))
        ok = ok and scaled and fast_pages
    print("result: " + ("every target met" if ok else "TARGET MISSED"))
    return 0 if ok else 1


def run_bench(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[dict, dict]:
    """The measures, on a stack of its own (Redis, two workers, a listener, the API, the
    egress proxy) whose every part is undone by `stack`, in reverse."""
    server = RedisServer()
    stack.callback(server.stop)
    run_dir = Path(tempfile.mkdtemp(prefix="titan-bench-"))
    stack.callback(shutil.rmtree, run_dir, True)
    files = Path(tempfile.mkdtemp(prefix="titan-bench-files-", dir="/var/tmp"))
    stack.callback(shutil.rmtree, files, True)
    plugins, args.markdown = plugin_tree(run_dir, files)
    settings = private_settings(server.url, plugins, run_dir, allowed_roots=(files,))
    client = docker.from_env()
    settings, egress_env = stack.enter_context(egress_case(settings, plugins, client))
    conn = counted_client(settings.redis_url)  # its round trips are not the product's
    Registry(wired(conn, settings)).reload()
    workers = [WorkerProcess(settings, f"bench{i}", concurrency=1, **egress_env)
               for i in (1, 2)]
    for w in workers:
        stack.callback(w.stop)
    listener = Listener(wired(redis.Redis.from_url(settings.redis_url), settings),
                        Registry(wired(redis.Redis.from_url(settings.redis_url), settings)),
                        Dispatcher(wired(conn, settings), make_celery(settings.broker)))
    stack.callback(listener.stop)
    args.api_socket = str(run_dir / "api.sock")
    api = api_server(create_app(wired(conn, settings), Registry(wired(conn, settings)),
                                Dispatcher(wired(conn, settings), make_celery(settings.broker))),
                     settings.api, args.api_socket)
    stack.callback(api.close)
    threading.Thread(target=api.run, daemon=True).start()
    for w in workers:
        w.wait_ready(conn)
    threading.Thread(target=listener.run, daemon=True).start()
    print(f"{args.runs} sequential runs per side (warm, cold, bare; interleaved), "
          f"then a burst of {args.burst}")
    with contextlib.ExitStack() as own:
        bares = {name: own.enter_context(contextlib.closing(
                     Bare(settings, client, run_dir / name, runtime, seccomp)))
                 for name, runtime, seccomp in (
                     ("base", None, True), ("base_gvisor", settings.gvisor_runtime, True),
                     ("base_gvisor_unconfined", settings.gvisor_runtime, False))}
        m = measure(args, Bus(conn, settings), bares, client, settings)
    if args.runs_only:
        return m, {}
    return m, {"scale": listener_scale(server.url),  # the stack is idle: its listener reads nothing
               "sustain": workers_scale(server.url, plugins),  # its own workers and keys
               "pages": console_times(server.url)}


if __name__ == "__main__":
    sys.exit(main())
