"""What `make bench` measures beside latency and throughput: Redis round trips per run,
the prewarm hit rate, idle memory per prewarmed container, fairness behind a slow plugin,
and the CLI's answer time. Each takes the bench's private stack as parameters."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import docker
import redis

from harness import SYSTEM_PYTHON, Bus, new_id, wired

ROOT = Path(__file__).resolve().parent.parent
HOG_S = 3.0
CROWD_S = 1.0
IDLE_S = 8.0  # how long Redis's idle traffic (beats, blocking reads timing out) is measured


class Counter:
    """Counts the bench's own round trips (each send waits for its replies): they are
    taken out of what Redis counts."""

    sent = 0


class CountedTcp(redis.Connection):
    def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        Counter.sent += 1
        return super().send_packed_command(command, check_health)


class CountedUnix(redis.UnixDomainSocketConnection):
    def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        Counter.sent += 1
        return super().send_packed_command(command, check_health)


def counted_client(url: str) -> redis.Redis:
    """A client on `url` (a unix socket, as `make up` serves Redis, or TCP)."""
    kind = CountedUnix if url.startswith("unix://") else CountedTcp
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, connection_class=kind))


def round_trips(conn: redis.Redis, runs: int, one_run: Callable[[], object],
                settle_s: float) -> float:
    """Round trips Redis served per run, every process counted (listener, workers' main
    and pool processes, Celery's events): the requests Redis read (INFO's
    total_reads_processed; a pipeline is one), minus the bench's own and minus the idle
    rate measured just before. The idle rate includes blocking reads that time out,
    which a run restarts instead (and are counted as the run's), so this errs low by a
    round trip or two; README's table is the count by construction."""
    def reads() -> int:
        return int(conn.info("stats")["total_reads_processed"])

    r0, own0, t0 = reads(), Counter.sent, time.monotonic()
    time.sleep(IDLE_S)
    idle = (reads() - r0 - (Counter.sent - own0)) / (time.monotonic() - t0)
    r0, own0, t0 = reads(), Counter.sent, time.monotonic()
    for _ in range(runs):
        one_run()
        time.sleep(settle_s)
    served = reads() - r0 - (Counter.sent - own0)
    return (served - max(0.0, idle) * (time.monotonic() - t0)) / runs


def fairness(bus: Bus) -> tuple[float, float]:
    """12 runs of a slow plugin queued on the two workers, then one event for another
    plugin: (its queue wait, one slow run's length), from their records."""
    records = wired(bus.conn, bus.settings).records
    hogs = [new_id("hog") for _ in range(12)]
    for event_id in hogs:
        bus.publish({"event_id": event_id, "topic": "bench.v1", "event_type": "hog",
                     "payload": {"seconds": HOG_S}})
    while sum(r.status == "running" for r in records.for_plugin("hog", 12)) < 2:
        time.sleep(0.05)
    quick = new_id("fair")
    bus.publish({"event_id": quick, "topic": "bench.v1", "event_type": "tick"})
    bus.result_of(quick, timeout=120)
    tick = next(r for r in records.for_plugin("noop", 50) if r.event_id == quick)
    for event_id in hogs:
        bus.result_of(event_id, timeout=300)
    lengths = [r.duration_s or 0 for r in records.for_plugin("hog", 12)]
    return (tick.started_at or 0) - tick.created_at, statistics.median(lengths)


def crowd(bus: Bus) -> tuple[float, float]:
    """5 plugins with 5 queued runs each on the two workers, then one event for another
    plugin: (its queue wait, one crowd run's length), from their records."""
    records = wired(bus.conn, bus.settings).records
    names = [f"crowd{n}" for n in range(1, 6)]
    runs = [(name, new_id(name)) for name in names for _ in range(5)]
    for name, event_id in runs:
        bus.publish({"event_id": event_id, "topic": "bench.v1", "event_type": name,
                     "payload": {"seconds": CROWD_S}})
    while sum(r.status == "running" for name in names
              for r in records.for_plugin(name, 5)) < 2:
        time.sleep(0.05)
    quick = new_id("crowd")
    bus.publish({"event_id": quick, "topic": "bench.v1", "event_type": "tick"})
    bus.result_of(quick, timeout=120)
    tick = next(r for r in records.for_plugin("noop", 50) if r.event_id == quick)
    for _, event_id in runs:
        bus.result_of(event_id, timeout=300)
    lengths = [r.duration_s or 0 for name in names for r in records.for_plugin(name, 5)]
    return (tick.started_at or 0) - tick.created_at, statistics.median(lengths)


def hit_rate(bus: Bus, runs: int) -> dict[str, float]:
    """The share of the measured runs of each prewarmed plugin that found a prewarmed
    container (titan_prewarm_hits_total over hits + misses), from their records."""
    records = wired(bus.conn, bus.settings).records
    rates = {}
    for plugin in ("noop", "noop_gvisor", "file_watcher"):
        recent = [r for r in records.for_plugin(plugin, runs) if r.warm is not None]
        rates[plugin] = sum(bool(r.warm) for r in recent) / max(1, len(recent))
    return rates


def cli_latency(api_socket: str, n: int = 10) -> dict[str, tuple[float, float]]:
    """Median wall time of `titan-plugins.py list|logs|health` run as an operator runs it
    (the system's python3, on its default channel: the API's socket), and of fetching the
    same answer with curl on that socket (the floor)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TITAN_")},
           "TITAN_API_URL": f"unix://{api_socket}"}
    out = {}
    for args, path in ((["list"], "/plugins"), (["logs", "noop"], "/plugins/noop/invocations"),
                       (["health"], "/health")):
        times = []
        for cmd in ([SYSTEM_PYTHON, str(ROOT / "titan-plugins.py"), *args],
                    ["curl", "-s", "-o", "/dev/null", "--unix-socket", api_socket,
                     "http://titan" + path]):
            runs = []
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=False)
                runs.append(time.perf_counter() - t0)
            times.append(statistics.median(runs))
        out[args[0]] = (times[0], times[1])
    return out


def idle_memory(client: docker.DockerClient, settings) -> dict[str, float]:
    """MiB held by one idle prewarmed container (its cgroup, as the engine reports it), by
    runtime (runc, runsc), and one of a plugin with a net grant (its HTTP client
    preloaded: `runc, net grant`)."""
    found: dict[str, float] = {}
    for pooled in client.containers.list(filters={"label": [
            f"titan.instance={settings.instance}", "titan.pool=1"]}):
        runtime = pooled.attrs["HostConfig"].get("Runtime") or "runc"
        plugin = pooled.labels.get("titan.plugin")
        if plugin == "noop_net":
            runtime = "runc, net grant"
        elif plugin not in ("noop", "noop_gvisor"):
            continue
        if runtime not in found:
            stats = pooled.stats(stream=False)["memory_stats"]
            used = stats.get("usage", 0) - stats.get("stats", {}).get("total_inactive_file", 0)
            found[runtime] = used / 1024**2
    return found
