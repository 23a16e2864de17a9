"""The console's pages with 10,000 runs stored (issue 46 asks each under 300 ms): a
private Redis, 20 plugins, 10,000 ended runs spread over them (a tenth failed, most
warm), an hour of per-minute counts and 200 dead letters; each page fetched 20 times
through the app (signed in, as a browser is) and its median printed, with the API's
`GET /health` of the same app as the baseline.

`python bench/console.py` runs it alone; `make bench` prints it with the rest."""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from scale import plugins_of  # noqa: E402

from harness import RedisServer, private_settings, wired  # noqa: E402
from manager.api.app import create_app  # noqa: E402
from manager.bus.dispatch import Dispatcher  # noqa: E402
from manager.bus.listener import dead_letter  # noqa: E402
from manager.core.contract import make_celery  # noqa: E402
from manager.core.records import InvocationRecord, Status  # noqa: E402
from manager.core.stats import minute_of  # noqa: E402
from manager.plugins.registry import Registry  # noqa: E402

RUNS = 10_000
PLUGINS = 20
TRIES = 20
TARGET_MS = 300.0


def store_runs(wiring, now: float) -> str:
    """RUNS ended runs over the plugins, the newest a minute old; returns one's id."""
    rng = random.Random(46)
    for n in range(RUNS):
        created = now - 3600 + n * 3600 / RUNS
        status = Status.FAILED if rng.random() < 0.1 else Status.SUCCEEDED
        record = InvocationRecord(
            invocation_id=uuid.uuid4().hex, plugin=f"sc{n % PLUGINS}", version="1.0.0",
            digest="0" * 64, event_id=uuid.uuid4().hex, topic="chat.v1", event_type="said",
            origin="bus", status=status, created_at=created, started_at=created + 0.01,
            finished_at=created + 0.06, duration_s=0.05 + rng.random() / 20,
            warm=rng.random() < 0.9, worker="bench@host", exit_code=0,
            stdout='{"topic": "x.v1", "event_type": "y"}\n', reason=None)
        wiring.records.create(record, due_in=3600)
        pipe = wiring.conn.pipeline(transaction=False)
        pipe.hincrby(wiring.keys.minute_stats(minute_of(record.finished_at)), "ended", 1)
        pipe.execute()
    return record.invocation_id


def page_times(redis_url: str, work: Path) -> dict[str, float]:
    settings = private_settings(redis_url, plugins_of(PLUGINS, work / "plugins"),
                                work).with_(api_token="bench-key")
    wiring = wired(redis.Redis.from_url(redis_url), settings)
    registry = Registry(wiring)
    registry.reload()
    last = store_runs(wiring, time.time())
    for n in range(200):
        dead_letter(wiring.conn, settings.stream, json.dumps({"n": n}), "invalid_event", "bench")
    app = create_app(wiring, registry, Dispatcher(wiring, make_celery(settings.broker)))
    client = app.test_client()
    form = client.get("/ui/signin")
    token = form.text.split('name="csrf" value="')[1].split('"')[0]
    assert client.post("/ui/signin", data={"csrf": token, "key": "bench-key"}).status_code == 303
    pages = {"GET /health (baseline)": "/health", "overview": "/ui/",
             "overview.json": "/ui/overview.json", "plugins": "/ui/plugins",
             "a plugin": "/ui/plugins/sc1", "runs": "/ui/runs",
             "runs, failed only": "/ui/runs?status=failed", "runs.json": "/ui/runs.json",
             "a run": f"/ui/runs/{last}", "dead letters": "/ui/dead", "workers": "/ui/workers"}
    times = {}
    for name, path in pages.items():
        took = []
        for _ in range(TRIES):
            started = time.perf_counter()
            answer = client.get(path)
            took.append(time.perf_counter() - started)
            assert answer.status_code in (200, 503), (path, answer.status_code)
        times[name] = statistics.median(took) * 1000
    return times


def console_times(redis_url: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="titan-bench-console-"))
    try:
        return page_times(redis_url, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def console_report(times: dict[str, float]) -> tuple[list[str], bool]:
    base = times["GET /health (baseline)"]
    lines = [f"console, {RUNS:,} runs stored: {name:>22} {ms:7.1f} ms ({ms / base:5.1f}x)"
             for name, ms in times.items()]
    slowest = max(ms for name, ms in times.items() if "baseline" not in name)
    ok = slowest < TARGET_MS
    lines.append(f"  target: every page < {TARGET_MS:.0f} ms: {'ok' if ok else 'MISSED'} "
                 f"(slowest {slowest:.1f} ms)")
    return lines, ok


if __name__ == "__main__":
    server = RedisServer()
    try:
        lines, ok = console_report(console_times(server.url))
        print("\n".join(lines))
    finally:
        server.stop()
    sys.exit(0 if ok else 1)
