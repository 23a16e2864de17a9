"""What grows with the number of plugins, each row a ratio to its own baseline (2 plugins,
or one listener) in the same run, on a private Redis:
- the listener's rate: 20,000 events that match no plugin, read, matched and
  acknowledged by one Listener with 2, 100 and 1,000 plugins loaded (each with two exact
  triggers and one glob, as issue 48 measured), once the listener has read the registry
  (as a running one has). Measured: 6,460, 6,688 and 6,889 events/s (1.07x at 1,000
  plugins; the plain rule's 15 ms an event made it 0.01x);
- the same for events that each match one plugin: the run's record and its task
  message made too (the dispatcher's cost, which does not grow with the plugins);
- two listener processes on one consumer group against one;
- `GET /plugins` (what `list` and the console ask), which lists every plugin, so grows;
- the memory of a process holding the registry and the listener's index.

`python bench/scale.py` runs it alone; `make bench` prints it with the rest."""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import RedisServer, private_settings, wired  # noqa: E402
from manager.api.app import create_app  # noqa: E402
from manager.bus.dispatch import Dispatcher  # noqa: E402
from manager.bus.group import ensure_group  # noqa: E402
from manager.bus.listener import Listener  # noqa: E402
from manager.core.config import Settings  # noqa: E402
from manager.core.contract import make_celery  # noqa: E402
from manager.plugins.registry import Registry  # noqa: E402

COUNTS = (2, 100, 1000)
EVENTS = 20000
MATCHING = 2000  # events that each create a run
LISTINGS = 20  # GET /plugins, each way
SCALE_TARGET = 0.6  # 1,000 plugins against 2, for events that match nothing
MATCH_TARGET = 0.5  # the same, for events that each match one plugin
MANIFEST = """name: {name}
version: 1.0.0
triggers:
  - {{topic: {name}.v1, event_type: a}}
  - {{topic: {name}.v2, event_type: b}}
  - {{topic: "{name}.*", event_type: "*"}}
entrypoint: python main.py
image: titan-runtime:py3.11
"""


def plugins_of(count: int, root: Path) -> Path:
    for n in range(count):
        name = f"sc{n}"
        (root / name).mkdir(parents=True)
        (root / name / "plugin.yaml").write_text(MANIFEST.format(name=name))
        (root / name / "main.py").write_text("print()\n")
    return root


def publish(conn: redis.Redis, stream: str, events: int = EVENTS, matching: int = 0) -> None:
    """`events` events: none matches a trigger, or (`matching` plugins) each matches
    one plugin's exact trigger, in turn."""
    pipe = conn.pipeline(transaction=False)
    for n in range(events):
        topic = f"sc{n % matching}.v1" if matching else "chat.v1"
        pipe.xadd(stream, {"event": (
            f'{{"event_id": "s{n}", "topic": "{topic}", "event_type": "a"}}')})
    pipe.execute()


def loaded(redis_url: str, count: int, work: Path) -> Settings:
    """Private settings (keys of their own) with `count` plugins loaded."""
    settings = private_settings(redis_url, plugins_of(count, Path(tempfile.mkdtemp(dir=work))),
                                work)
    Registry(wired(redis.Redis.from_url(redis_url), settings)).reload()
    return settings


def listener_rate(redis_url: str, count: int, work: Path, matching: bool = False) -> float:
    """Events/s one listener handles with `count` plugins loaded (none matches, or each
    event one of them)."""
    settings = loaded(redis_url, count, work)
    wiring = wired(redis.Redis.from_url(redis_url), settings)
    ensure_group(wiring.conn, settings.stream)
    events = MATCHING if matching else EVENTS
    publish(wiring.conn, settings.event_stream, events, count if matching else 0)
    listener = Listener(wiring, Registry(wiring), Dispatcher(wiring, make_celery(settings.broker)))
    listener.index(None)  # a running listener has read the registry before events come
    started, done = time.perf_counter(), 0
    while done < events:
        done += listener.poll()
    return events / (time.perf_counter() - started)


def listing_time(redis_url: str, count: int, work: Path) -> float:
    """Seconds one `GET /plugins` takes with `count` plugins (the API's own app)."""
    settings = loaded(redis_url, count, work)
    wiring = wired(redis.Redis.from_url(redis_url), settings)
    client = create_app(wiring, Registry(wiring), Dispatcher(wiring, make_celery(settings.broker))
                        ).test_client()
    assert client.get("/plugins").status_code == 200
    started = time.perf_counter()
    for _ in range(LISTINGS):
        listed = client.get("/plugins")
    assert len(listed.json["plugins"]) == count, listed.json
    return (time.perf_counter() - started) / LISTINGS


def held(redis_url: str, settings_dict: dict, answer: Any) -> None:
    """A process that reads the registry and builds the listener's index: its peak RSS."""
    settings = Settings.model_validate(settings_dict)
    wiring = wired(redis.Redis.from_url(redis_url), settings)
    Listener(wiring, Registry(wiring), Dispatcher(wiring, make_celery(settings.broker))).index(None)
    answer.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def memory_mib(redis_url: str, count: int, work: Path) -> float:
    settings = loaded(redis_url, count, work)
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    proc = context.Process(target=held, args=(redis_url, settings.model_dump(), answer))
    proc.start()
    mib = answer.get(timeout=120)
    proc.join()
    return mib


def drain(redis_url: str, settings_dict: dict, ready: Any) -> None:
    """One listener process: once every one has read the registry, reads until the
    stream has nothing new for it."""
    settings = Settings.model_validate(settings_dict)
    wiring = wired(redis.Redis.from_url(redis_url), settings)
    listener = Listener(wiring, Registry(wiring), Dispatcher(wiring, make_celery(settings.broker)))
    listener.index(None)
    ready.wait()
    while listener.poll():
        pass


def listeners_rate(redis_url: str, processes: int, work: Path) -> float:
    """Events/s of `processes` listener processes on one consumer group (100 plugins),
    timed from when all of them are ready (a process's start is not the listener's)."""
    settings = private_settings(redis_url, plugins_of(100, work / f"l{processes}"), work,
                                read_block_ms=100)
    wiring = wired(redis.Redis.from_url(redis_url), settings)
    Registry(wiring).reload()
    ensure_group(wiring.conn, settings.stream)
    publish(wiring.conn, settings.event_stream)
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes + 1)
    procs = [context.Process(target=drain, args=(redis_url, settings.model_dump(), ready))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    ready.wait(timeout=120)
    started = time.perf_counter()
    for proc in procs:
        proc.join()
    return EVENTS / (time.perf_counter() - started)


Rows = dict[str, dict[str, float]]  # a row's name -> its columns (the first: the base)


def listener_scale(redis_url: str) -> Rows:
    work = Path(tempfile.mkdtemp(prefix="titan-bench-scale-"))
    try:
        def by_count(measure: Any) -> dict[str, float]:
            return {f"{count} plugins": measure(redis_url, count, work) for count in COUNTS}
        return {
            "listener, events matching nothing (events/s)": by_count(listener_rate),
            "listener, events matching one plugin (events/s)": by_count(
                lambda url, count, at: listener_rate(url, count, at, matching=True)),
            "listeners on one group, 100 plugins (events/s)": {
                f"{n} listener(s)": listeners_rate(redis_url, n, work) for n in (1, 2)},
            "GET /plugins (ms)": {k: v * 1000 for k, v in by_count(listing_time).items()},
            "registry and index held (MiB, peak RSS)": by_count(memory_mib),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def scale_report(rows: Rows) -> tuple[list[str], bool]:
    """The table, each cell with its ratio to the row's first; the targets issue 48 set."""
    lines = []
    for name, cells in rows.items():
        base = next(iter(cells.values()))
        lines.append(f"{name}: " + ", ".join(f"{what} {value:.0f} ({value / base:.2f}x)"
                                            for what, value in cells.items()))
    nothing = list(rows["listener, events matching nothing (events/s)"].values())
    one = list(rows["listener, events matching one plugin (events/s)"].values())
    two = list(rows["listeners on one group, 100 plugins (events/s)"].values())
    ok = nothing[-1] / nothing[0] >= SCALE_TARGET and one[-1] / one[0] >= MATCH_TARGET
    lines.append(f"  targets: {COUNTS[-1]} plugins >= {SCALE_TARGET}x {COUNTS[0]} matching "
                 f"nothing, >= {MATCH_TARGET}x matching one: {'ok' if ok else 'MISSED'}; "
                 f"2 listeners against 1: {two[1] / two[0]:.2f}x (issue 48 asks 1.6x)")
    return lines, ok


if __name__ == "__main__":
    server = RedisServer()
    try:
        lines, ok = scale_report(listener_scale(server.url))
        print("\n".join(lines))
    finally:
        server.stop()
    sys.exit(0 if ok else 1)
