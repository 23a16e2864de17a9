#!/usr/bin/env python3
"""`make bench`: Titan end to end vs. the same container run directly, in the same run.

Latency: event XADDed -> result event read, sequentially, vs. a bare Docker SDK run (create,
start, wait, read output, remove) of the same image, command and limits.
Throughput: a burst of events through two workers vs. the same containers run directly by
two threads at once. Prints p50/p99, events/s and the ratios against their targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import Bus, RedisServer, WorkerProcess, new_id, private_settings  # noqa: E402
from manager.dispatch import Dispatcher, make_celery  # noqa: E402
from manager.listener import Listener  # noqa: E402
from manager.manifest import load_manifest  # noqa: E402
from manager.registry import Registry  # noqa: E402
from manager.runs import RunLimits  # noqa: E402
from workers.sandbox import RunSpec, Sandbox  # noqa: E402

PLUGIN_DIR = ROOT / "bench" / "plugins"
LATENCY_TARGET = 1.15
THROUGHPUT_TARGET = 0.9


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bare:
    """The baseline: the same container and limits through the Docker SDK, no Titan."""

    def __init__(self, settings, client: docker.DockerClient) -> None:
        manifest = load_manifest(PLUGIN_DIR / "noop")
        event_file = Path(tempfile.mkstemp(suffix=".json", dir="/var/tmp")[1])
        event_file.write_text("{}")
        event_file.chmod(0o644)
        spec = RunSpec("bench", "noop", "1.0.0", manifest.image, tuple(manifest.argv),
                       str(PLUGIN_DIR / "noop"), "{}", str(event_file),
                       RunLimits.of(manifest, settings))
        self.options = Sandbox(settings, client).container_options(spec)
        self.options.pop("log_config")  # a plain `docker run` keeps the default log driver
        self.client = client

    def run(self) -> float:
        t0 = time.perf_counter()
        out = self.client.containers.run(**self.options, remove=True, stdout=True)
        assert b"tock" in out, out
        return time.perf_counter() - t0


def e2e_once(bus: Bus) -> float:
    event_id = new_id("bench")
    t0 = time.perf_counter()
    bus.publish({"event_id": event_id, "topic": "bench.v1", "event_type": "tick"})
    result = bus.result_of(event_id, timeout=60)
    assert result["event_type"] == "tock", result
    return time.perf_counter() - t0


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40, help="sequential runs per side")
    parser.add_argument("--burst", type=int, default=80, help="events in the throughput burst")
    args = parser.parse_args()

    server = RedisServer()
    run_dir = Path(tempfile.mkdtemp(prefix="titan-bench-"))
    settings = private_settings(server.url, PLUGIN_DIR, run_dir)
    conn = redis.Redis.from_url(settings.redis_url)
    Registry(conn, settings).reload()
    workers = [WorkerProcess(settings, f"bench{i}", concurrency=1) for i in (1, 2)]
    listener = Listener(redis.Redis.from_url(settings.redis_url), settings,
                        Registry(redis.Redis.from_url(settings.redis_url), settings),
                        Dispatcher(conn, settings, make_celery(settings)))
    thread = threading.Thread(target=listener.run, daemon=True)
    client = docker.from_env()
    try:
        for w in workers:
            w.wait_ready(conn)
        thread.start()
        bus = Bus(conn, settings)
        bare = Bare(settings, client)
        print(f"warming up ({args.runs} sequential runs per side, burst of {args.burst})")
        for _ in range(3):
            e2e_once(bus)
            bare.run()
        e2e, base = [], []
        for _ in range(args.runs):  # interleaved, so drift hits both sides alike
            e2e.append(e2e_once(bus))
            base.append(bare.run())
        t_titan = burst(bus, args.burst)
        t_direct = direct_parallel(bare, args.burst, 2)
    finally:
        listener.stop()
        for w in workers:
            w.stop()
        server.stop()
    p50, p99 = statistics.median(e2e), pct(e2e, 0.99)
    b50, b99 = statistics.median(base), pct(base, 0.99)
    tp_titan, tp_direct = args.burst / t_titan, args.burst / t_direct
    lat_ratio, tp_ratio = p50 / b50, tp_titan / tp_direct
    print(f"latency   titan end-to-end  p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    print(f"          bare docker run   p50 {b50 * 1000:7.1f} ms  p99 {b99 * 1000:7.1f} ms")
    print(f"          ratio p50 {lat_ratio:.3f} (target <= {LATENCY_TARGET})  "
          f"p99 {p99 / b99:.3f}")
    print(f"throughput titan 2 workers  {tp_titan:6.2f} events/s ({args.burst} in {t_titan:.2f}s)")
    print(f"          direct 2 threads  {tp_direct:6.2f} runs/s   "
          f"({args.burst} in {t_direct:.2f}s)")
    print(f"          ratio {tp_ratio:.3f} (target >= {THROUGHPUT_TARGET})")
    ok = lat_ratio <= LATENCY_TARGET and tp_ratio >= THROUGHPUT_TARGET
    print("result: " + ("both targets met" if ok else "TARGET MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
