"""Fixtures that start real services on private ports with private names and labels:
a redis-server, Celery worker processes, an in-process bus listener; containers run on
the machine's Docker engine under this session's own instance label and are removed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
import yaml

from manager.config import ROOT, Settings
from manager.dispatch import Dispatcher, make_celery
from manager.listener import Listener
from manager.registry import Registry

TEST_PLUGINS = Path(__file__).parent / "plugins"
WORKER_START_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="titan-redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    conn = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(conn.ping())
        except redis.ConnectionError:
            return False

    wait_until(up, 20, "redis-server")
    yield url
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def files_dir() -> Iterator[Path]:
    """A directory test plugins may read (not under /tmp: the sandbox's /tmp is a tmpfs)."""
    path = Path(tempfile.mkdtemp(prefix="titan-test-files-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def plugins_dir(files_dir: Path) -> Iterator[Path]:
    """The built-in plugins plus tests/plugins; file_watcher may read files_dir."""
    path = Path(tempfile.mkdtemp(prefix="titan-test-plugins-"))
    for src in [*sorted((ROOT / "plugins").iterdir()), *sorted(TEST_PLUGINS.iterdir())]:
        if src.is_dir():
            shutil.copytree(src, path / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = path / "file_watcher" / "plugin.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["permissions"]["fs"]["allow"] = [f"{files_dir}/**"]
    manifest.write_text(yaml.safe_dump(data))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(redis_url: str, plugins_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Settings:
    uid = uuid.uuid4().hex[:8]
    run_dir = tmp_path_factory.mktemp("run")
    prefix = f"titantest{uid}"
    return Settings.from_env(
        redis_url=redis_url, key_prefix=prefix, event_stream=f"{prefix}:events",
        dead_stream=f"{prefix}:events:dead", task_queue=f"{prefix}.plugins",
        instance=f"test-{uid}", plugins_dir=plugins_dir, run_dir=run_dir,
        cache_dir=Path(tempfile.mkdtemp(prefix="titan-test-cache-", dir="/var/tmp")),
        worker_name=f"testhost-{uid}", api_token="", reclaim_idle_ms=60_000,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a worker process needs to share this test's private names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TITAN_", "PROMETHEUS"))}
    env.update({
        "TITAN_REDIS_URL": settings.redis_url, "TITAN_KEY_PREFIX": settings.key_prefix,
        "TITAN_EVENT_STREAM": settings.event_stream, "TITAN_DEAD_STREAM": settings.dead_stream,
        "TITAN_TASK_QUEUE": settings.task_queue, "TITAN_INSTANCE": settings.instance,
        "TITAN_PLUGINS_DIR": str(settings.plugins_dir), "TITAN_RUN_DIR": str(settings.run_dir),
        "TITAN_CACHE_DIR": str(settings.cache_dir), "TITAN_WORKER_NAME": settings.worker_name,
    })
    return env


@pytest.fixture(scope="session")
def conn(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    return docker.from_env()


@pytest.fixture(scope="session")
def registry(conn: redis.Redis, settings: Settings) -> Registry:
    reg = Registry(conn, settings)
    reg.reload()
    return reg


@pytest.fixture(scope="session")
def dispatcher(conn: redis.Redis, settings: Settings) -> Dispatcher:
    return Dispatcher(conn, settings, make_celery(settings))


class WorkerProcess:
    """A real `celery worker` process on the test's private queue."""

    def __init__(self, settings: Settings, name: str, concurrency: int = 2) -> None:
        self.settings = settings
        self.name = name
        self.log = settings.run_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
               "-Q", settings.task_queue, "-n", f"{name}@%h", "-c", str(concurrency),
               "-P", "prefork", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=settings_env(settings),
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, conn: redis.Redis) -> None:
        key = f"{self.settings.key_prefix}:worker:{self.name}@{socket.gethostname()}"

        def ready() -> bool:
            assert self.proc.poll() is None, f"worker died:\n{self.log.read_text()[-3000:]}"
            return bool(conn.exists(key))

        wait_until(ready, WORKER_START_S, f"worker {self.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def worker(settings: Settings, conn: redis.Redis, registry: Registry,
           docker_client: docker.DockerClient) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(settings, "testworker")
    proc.wait_ready(conn)
    yield proc
    proc.stop()
    leftovers = docker_client.containers.list(
        all=True, filters={"label": f"titan.instance={settings.instance}"})
    for c in leftovers:
        c.remove(force=True)
    assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"


@pytest.fixture(scope="session")
def listener(conn: redis.Redis, settings: Settings, registry: Registry,
             dispatcher: Dispatcher) -> Iterator[Listener]:
    lst = Listener(redis.Redis.from_url(settings.redis_url), settings,
                   Registry(redis.Redis.from_url(settings.redis_url), settings), dispatcher)
    thread = threading.Thread(target=lst.run, daemon=True)
    thread.start()
    yield lst
    lst.stop()
    thread.join(10)


@pytest.fixture(scope="session")
def stack(worker: WorkerProcess, listener: Listener) -> None:
    """The whole pipeline: listener + worker processes on real Redis and Docker."""


class Bus:
    """Publishes to and reads from the test's private stream."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings

    def publish(self, event: dict[str, Any] | str | bytes) -> str:
        raw = event if isinstance(event, (str, bytes)) else json.dumps(event)
        return self.conn.xadd(self.settings.event_stream, {"event": raw}).decode()

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float = 60,
                   stream: str | None = None, after: str = "0-0") -> dict[str, Any]:
        """Reads the stream (blocking, no sleeps) until an event satisfies `match`."""
        stream = stream or self.settings.event_stream
        deadline = time.monotonic() + timeout
        last = after
        while time.monotonic() < deadline:
            reply = self.conn.xread({stream: last}, count=100, block=500)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    item = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                    try:
                        event = json.loads(item.get("event", "null"))
                    except ValueError:
                        event = None
                    data = {**item, "event": event}
                    if match(data):
                        return data
        raise AssertionError(f"no matching entry on {stream} within {timeout}s")

    def result_of(self, event_id: str, timeout: float = 60) -> dict[str, Any]:
        """The first event caused by `event_id` (a result or a failure event)."""
        return self.wait_event(lambda d: isinstance(d["event"], dict)
                               and d["event"].get("causation_id") == event_id, timeout)["event"]

    def dead_letter(self, entry_id: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait_event(lambda d: d.get("entry_id") == entry_id, timeout,
                               stream=self.settings.dead_stream)


@pytest.fixture
def bus(conn: redis.Redis, settings: Settings) -> Bus:
    return Bus(conn, settings)


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
