"""Runs/s against the number of worker processes: 1, 2 and 4 `celery worker` processes
(concurrency 1 each, the warm path, a pool of one ready container per process), each
sustaining a backlog of EVENTS events published at once, timed from the first event to
the last result. Each row says how many of its runs were warm, and the pool's refill
rate (containers prewarmed per second) against the rate runs consume them. Each rate is a
ratio to one process in the same run.

`python bench/workers_scale.py [--events N]` runs it alone; `make bench` prints it with
the rest."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import docker
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import (  # noqa: E402
    Bus,
    RedisServer,
    WorkerProcess,
    new_id,
    private_settings,
    records_of,
    wired,
)
from manager.bus.dispatch import Dispatcher  # noqa: E402
from manager.bus.group import ensure_group  # noqa: E402
from manager.bus.listener import Listener  # noqa: E402
from manager.core.contract import make_celery  # noqa: E402
from manager.plugins.registry import Registry  # noqa: E402

PROCESSES = (1, 2, 4)  # (the command line may ask fewer)
EVENTS = 1000
WARMUP = 8  # events before the clock starts: every process's pool filled once


def results(bus: Bus, ids: set[str], start: bytes | str) -> None:
    """Reads the stream from `start` until every id in `ids` has its result."""
    pending, last = set(ids), start
    while pending:
        for _, entries in bus.conn.xread({bus.settings.event_stream: last}, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                pending.discard(json.loads(fields[b"event"]).get("causation_id"))


class PoolCreates:
    """Counts the prewarmed containers an instance's workers create while it is open,
    from the engine's event stream as it happens (asked afterwards, the engine keeps only
    its last 256 events: a run makes about ten)."""

    def __init__(self, client: docker.DockerClient, instance: str) -> None:
        self.stream = client.events(decode=True, filters={
            "type": "container", "event": "create", "label": f"titan.instance={instance}"})
        self.count = 0
        self.thread = threading.Thread(target=self._count, daemon=True)

    def _count(self) -> None:
        with contextlib.suppress(Exception):  # the stream closed under it: counting is over
            for event in self.stream:
                self.count += event["Actor"]["Attributes"].get("titan.pool") == "1"

    def __enter__(self) -> PoolCreates:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stream.close()
        self.thread.join(5)


def publish(bus: Bus, n: int) -> set[str]:
    ids = {new_id("sustain") for _ in range(n)}
    for event_id in ids:
        bus.publish({"event_id": event_id, "topic": "bench.v1", "event_type": "tick"})
    return ids


def sustained(redis_url: str, processes: int, plugins: Path, work: Path,
              events: int) -> dict[str, float]:
    """One configuration's rate, warm share and the pool's refill rate."""
    settings = private_settings(redis_url, plugins, work, prewarm_size=1, prewarm_max=1)
    conn = redis.Redis.from_url(redis_url)
    Registry(wired(conn, settings)).reload()
    ensure_group(conn, settings.stream)
    workers = [WorkerProcess(settings, f"sustain{processes}-{i}", concurrency=1)
               for i in range(processes)]
    listener = Listener(wired(redis.Redis.from_url(redis_url), settings),
                        Registry(wired(conn, settings)),
                        Dispatcher(wired(conn, settings), make_celery(settings.broker)))
    threading.Thread(target=listener.run, daemon=True).start()
    bus, client = Bus(conn, settings), docker.from_env()
    try:
        for worker in workers:
            worker.wait_ready(conn)
        start = conn.xinfo_stream(settings.event_stream)["last-generated-id"]
        results(bus, publish(bus, WARMUP), start)
        time.sleep(2)  # the last warm-up run's replacement is ready
        start = conn.xinfo_stream(settings.event_stream)["last-generated-id"]
        with PoolCreates(client, settings.instance) as created:
            t0 = time.perf_counter()
            ids = publish(bus, events)
            results(bus, ids, start)
            elapsed = time.perf_counter() - t0
        prewarmed = created.count
        runs = [r for r in records_of(conn, settings, "noop", events + WARMUP)
                if r["event_id"] in ids]
        warm = sum(bool(r.get("warm")) for r in runs)
        return {"runs/s": events / elapsed, "warm": warm / events,
                "refill/s": prewarmed / elapsed, "warm runs/s": warm / elapsed}
    finally:
        listener.stop()
        for worker in workers:
            worker.stop()


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def workers_scale(redis_url: str, plugins: Path, events: int = EVENTS) -> dict[int, dict]:
    work = Path(tempfile.mkdtemp(prefix="titan-bench-workers-"))
    try:
        return {n: sustained(redis_url, n, plugins, mkdir(work / f"w{n}"), events)
                for n in PROCESSES}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def workers_report(rows: dict[int, dict]) -> list[str]:
    one = rows[PROCESSES[0]]["runs/s"]
    return [f"worker processes, sustained warm runs: {n} process(es) {row['runs/s']:6.1f} "
            f"runs/s ({row['runs/s'] / one:.2f}x), {row['warm']:.0%} warm, pool refilled "
            f"{row['refill/s']:.1f}/s against {row['warm runs/s']:.1f} warm runs/s"
            for n, row in rows.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=EVENTS)
    args = parser.parse_args()
    server = RedisServer()
    plugins = Path(tempfile.mkdtemp(prefix="titan-bench-plugins-"))
    shutil.copytree(ROOT / "bench" / "plugins" / "noop", plugins / "noop")
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        stack.callback(shutil.rmtree, plugins, ignore_errors=True)
        print("\n".join(workers_report(workers_scale(server.url, plugins, args.events))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
