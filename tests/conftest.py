"""Fixtures that start real services on private ports with private names and labels:
a redis-server, Celery worker processes, an in-process bus listener; containers run on
the machine's Docker engine under this session's own instance label and are removed."""

from __future__ import annotations

import collections
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import redis
import yaml
from hoststate import CLAIMS, MARK, TAGGED, HostState, own_prefix

from harness import (
    SESSION_DIR,
    Bus,
    RedisServer,
    WorkerProcess,
    free_port,
    private_settings,
    session_dir,
    wait_until,
    wired,
)
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener
from manager.core.config import ROOT, Settings
from manager.core.contract import make_celery
from manager.plugins.registry import Registry
from manager.service import api_server, tcp_api
from redis_nodes import tls_lines
from workers.container import remove_container
from workers.identity import Identities

pytest_plugins = ("lanes",)  # the hostile plugin's lanes, for every file that attacks
TEST_PLUGINS = Path(__file__).parent / "plugins"
HOSTILE_PLUGINS = Path(__file__).parent / "hostile"
BUILTINS = ("file_watcher", "shell_runner")
# What each integration file costs (seconds, the mean of two clean-clone CIs; a file not
# named costs a second per test). The streams take whole files (--dist loadfile), and
# xdist hands them out in collection order: the costliest go first, so the last file a
# stream starts is a short one and no stream runs alone at the end (longest processing
# time first: 1 to 1.5 minutes off the integration layer's 11.5 to 13).
SECONDS = {
    "test_hostile.py": 438, "test_healing.py": 249, "test_compose.py": 140,
    "test_delivery.py": 122, "test_boundary.py": 113, "test_made_up.py": 100,
    "test_redis_ha.py": 95, "test_zygote.py": 95, "test_timers.py": 94, "test_egress.py": 90,
    "test_crowd.py": 83, "test_redis_crash.py": 78, "test_pool.py": 75,
    "test_worker_hosts.py": 75, "test_docs.py": 74, "test_author.py": 62,
    "test_builtins_hostile.py": 59, "test_containment.py": 59, "test_operator.py": 57,
    "test_trust.py": 57, "test_reload.py": 50, "test_fairness.py": 50, "test_clocks.py": 37,
    "test_api_schema.py": 32,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files in the order of their cost, costliest first; a file's tests keep their order
    (`make test` passes --no-loadscope-reorder, which would order files by their count)."""
    tests = collections.Counter(item.path.name for item in items)
    cost = {name: SECONDS.get(name, count) for name, count in tests.items()}
    items.sort(key=lambda item: (-cost[item.path.name], item.path.name))


def pytest_configure(config: pytest.Config) -> None:
    """Marks every process started from here on as this session's, and keeps pytest's own
    temporary files in one private directory that goes with the session. What tempfile
    makes goes into a directory tagged with the session (an xdist worker inherits it),
    like everything the suite puts in /tmp or /var/tmp itself (own_prefix): the host
    check then tells this session's files from another's beside it."""
    os.environ.setdefault(MARK, uuid.uuid4().hex)
    os.environ[SESSION_DIR] = tempfile.mkdtemp(prefix=own_prefix("test"), dir="/var/tmp")
    os.environ.setdefault(CLAIMS, f"{os.environ[SESSION_DIR]}/claims")  # the controller's
    config.stash[OWN_DIRS] = [os.environ[SESSION_DIR]]
    if config.option.basetemp is None:  # at the top of /tmp: its sockets' paths are short
        config.option.basetemp = tempfile.mkdtemp(prefix=own_prefix("pytest"), dir="/tmp")
        config.stash[OWN_DIRS].append(config.option.basetemp)
    if TAGGED.search(Path(tempfile.gettempdir()).name) is None:
        shared = tempfile.mkdtemp(prefix=own_prefix("tmp"), dir="/tmp")
        os.chmod(shared, 0o1777)  # as /tmp: other accounts of a test make files there too
        os.environ["TMPDIR"] = shared
        tempfile.tempdir = None  # read TMPDIR again
        config.stash[OWN_DIRS].append(shared)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in config.stash.get(OWN_DIRS, []):
        shutil.rmtree(path, ignore_errors=True)


OWN_DIRS = pytest.StashKey[list[str]]()
HOST_SETTLE_S = 60  # containers go in the background, daemons take a moment to exit
HOST_BEFORE = pytest.StashKey[HostState]()


def _controls(config: pytest.Config) -> bool:
    """The process that judges the host: the only one, or pytest-xdist's controller (its
    workers run tests side by side and never see the whole session)."""
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _controls(session.config):
        session.config.stash[HOST_BEFORE] = HostState.read(os.environ[MARK])


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The host as the suite found it (tests/hoststate.py): any difference fails the
    session, listed."""
    before = session.config.stash.get(HOST_BEFORE, None)
    if before is None:
        return
    # Run uids leased by workers the tests SIGKILLed on purpose: here /proc shows every
    # process of the host, so nothing runs as them once their owner is gone.
    Identities(Settings.from_env().identity).reclaim(older_than_s=0)

    def unchanged() -> bool:
        return not before.changes(HostState.read(os.environ[MARK]))

    try:
        wait_until(unchanged, HOST_SETTLE_S, "the host to be as the suite found it")
    except AssertionError:
        changes = before.changes(HostState.read(os.environ[MARK]))
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "the test suite changed the host:\n  " + "\n  ".join(changes)
        if reporter is not None:
            reporter.write_sep("!", "host changed", red=True)
            reporter.write_line(text)
        else:
            print(text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's Redis: the socket, and a TLS-only port that requires a client
    certificate (`tls_url`: what a worker on another host connects to)."""
    tls_port = free_port()
    server = RedisServer(conf=tuple(tls_lines(tls_port)[1:]))  # the socket stays
    server.tls_url = f"rediss://default:{server.password}@127.0.0.1:{tls_port}/0"
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def host_port() -> Iterator[int]:
    """A TCP port the host listens on, on every address (a service a plugin must never
    reach: it has no network)."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture(scope="session")
def files_dir() -> Iterator[Path]:
    """A directory test plugins may read (not under /tmp: the sandbox's /tmp is a tmpfs)."""
    path = Path(tempfile.mkdtemp(prefix=own_prefix("files"), dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A root-owned directory every local user can reach (pytest's own tmp_path is 0700,
    and a plugin reads only what its user, 65534, could)."""
    path = Path(tempfile.mkdtemp(prefix=own_prefix("public"), dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def copy_plugins(target: Path, names: list[str] | None = None,
                 sources: tuple[Path, ...] = (TEST_PLUGINS, HOSTILE_PLUGINS)) -> Path:
    """Copies plugins (by name, or every one of `sources`) into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for source in sources:
        for src in sorted(source.iterdir()):
            if src.is_dir() and (names is None or src.name in names):
                shutil.copytree(src, target / src.name,
                                ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(scope="session")
def plugins_dir(files_dir: Path) -> Iterator[Path]:
    """The integration stack's plugins: tests/plugins, the hostile plugin and the
    built-ins named in BUILTINS (their own tests need them), nothing else of plugins/;
    file_watcher may read files_dir."""
    path = Path(tempfile.mkdtemp(prefix="titan-test-plugins-"))
    copy_plugins(path)
    copy_plugins(path, list(BUILTINS), (ROOT / "plugins",))
    for name in ("file_watcher", "hostile"):
        manifest = path / name / "plugin.yaml"
        data = yaml.safe_load(manifest.read_text())
        data["permissions"]["fs"]["allow"] = [f"{files_dir}/**"]
        manifest.write_text(yaml.safe_dump(data))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def unit_plugins() -> Iterator[Path]:
    """The fast layer's plugins: test plugins with no requirements (nothing to install)."""
    path = Path(tempfile.mkdtemp(prefix="titan-unit-plugins-"))
    copy_plugins(path, [p.name for p in TEST_PLUGINS.iterdir()
                        if not (p / "requirements.txt").exists()])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def unit_settings(settings: Settings, unit_plugins: Path) -> Settings:
    """The session's settings over the fast layer's plugins (no Docker, no workers)."""
    return settings.with_(plugins_dir=unit_plugins)


@pytest.fixture(scope="session")
def settings(redis_url: str, plugins_dir: Path, files_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = private_settings(redis_url, plugins_dir, tmp_path_factory.mktemp("run"),
                                allowed_roots=(files_dir,))
    yield settings
    shutil.rmtree(settings.cache_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def conn(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    return docker.from_env()


@pytest.fixture(scope="session")
def registry(conn: redis.Redis, settings: Settings) -> Registry:
    reg = Registry(wired(conn, settings))
    reg.reload()
    return reg


@pytest.fixture(scope="session")
def dispatcher(conn: redis.Redis, settings: Settings) -> Dispatcher:
    return Dispatcher(wired(conn, settings), make_celery(settings.broker))


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
        remove_container(c)
    assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"


@pytest.fixture(scope="session")
def listener(conn: redis.Redis, settings: Settings, registry: Registry,
             dispatcher: Dispatcher) -> Iterator[Listener]:
    lst = Listener(wired(redis.Redis.from_url(settings.redis_url), settings),
                   Registry(wired(redis.Redis.from_url(settings.redis_url), settings)), dispatcher)
    thread = threading.Thread(target=lst.run, daemon=True)
    thread.start()
    yield lst
    lst.stop()
    thread.join(10)


@pytest.fixture(scope="session")
def stack(worker: WorkerProcess, listener: Listener) -> None:
    """The whole pipeline: listener + worker processes on real Redis and Docker."""


@pytest.fixture
def bus(conn: redis.Redis, settings: Settings) -> Bus:
    return Bus(conn, settings)


@pytest.fixture(scope="session")
def app(settings: Settings, conn: redis.Redis, registry: Registry, dispatcher: Dispatcher):
    return create_app(wired(conn, settings), registry, dispatcher)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def api_url(app, stack, settings: Settings) -> Iterator[str]:
    """The API as the CLI reaches it by default: its own socket (unix://), served as the
    manager serves it, beside the HTTP port."""
    port = free_port()
    socket_path = session_dir() / "api.sock"
    (session_dir() / "tcp").mkdir(mode=0o700, exist_ok=True)
    tcp, front = tcp_api(app, settings.with_(api_port=port,
                                             api_socket=session_dir() / "tcp" / "api.sock").api)
    servers = [tcp, api_server(app, settings.api, str(socket_path))]
    for server in servers:
        threading.Thread(target=server.run, daemon=True).start()
    yield f"unix://{socket_path}"
    front.stop()
    for server in servers:
        server.close()
