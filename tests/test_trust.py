"""Trust, tried as an attacker would (SPEC §3, §6): pip never runs as root and cannot reach
the host even when the parser is bypassed; nothing in the run directory is readable by
another local account; the API needs its key; one client cannot hold the API; the
manager's own topics cannot be forged; caches and stored bundles stay bounded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from harness import SYSTEM_PYTHON, free_port, private_settings, wait_until, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.core.config import ROOT, Settings
from manager.core.contract import make_celery
from manager.core.errors import DependencyError
from manager.plugins.deps import install_requirements
from manager.plugins.installer import InstallSandbox
from manager.plugins.janitor import CacheJanitor
from manager.plugins.registry import Registry
from manager.plugins.requirements import Requirements
from manager.service import tcp_api

pytestmark = pytest.mark.integration
EVIL_SETUP = """\
from setuptools import setup
open({marker!r}, "w").write("pwned")
setup(name="evilpkg", version="1.0")
"""

# The install sandbox.

HOSTILE = """
import json, os
report = {"uid": os.getuid(), "gid": os.getgid(), "wrote": [], "read": []}
for path in json.loads(os.environ.get("TARGETS", "[]")) or TARGETS:
    try:
        with open(path, "w") as fh:
            fh.write("pwned")
        report["wrote"].append(path)
    except OSError:
        pass
for path in READS:
    try:
        with open(path, "rb") as fh:
            fh.read(10)
        report["read"].append(path)
    except OSError:
        pass
with open("/proc/self/status") as fh:
    report["caps"] = [ln.split()[1] for ln in fh if ln.startswith("CapEff")][0]
report["sees"] = sorted(os.listdir("/"))
import socket
report["reached"] = []
for family, address in CONNECT:
    try:
        with socket.socket(getattr(socket, family)) as sock:
            sock.settimeout(2)
            sock.connect(tuple(address) if family == "AF_INET" else address)
        report["reached"].append(address)
    except OSError:
        pass
print(json.dumps(report))
"""


def test_code_run_in_the_install_sandbox_reaches_nothing_on_the_host(settings: Settings,
                                                                     tmp_path: Path) -> None:
    """The sandbox alone holds: code pip might run (a setup.py) runs unprivileged and can
    write only its own work directory, and read nothing of the project or run dir."""
    marker = f"titan-pwned-{uuid.uuid4().hex[:8]}"
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "redis.url").write_text("redis://default:secret@127.0.0.1:1/0")
    targets = [f"/tmp/{marker}", f"/var/tmp/{marker}", str(ROOT / marker),
               str(run_dir / marker), str(settings.cache_dir / marker), f"/root/{marker}",
               f"/etc/{marker}", f"/usr/{marker}", f"/install/{marker}"]
    reads = ["/etc/shadow", str(run_dir / "redis.url"), str(ROOT / "setup.cfg"),
             "/root/.bashrc", "/etc/passwd"]
    # what the host offers on its network: a TCP port on loopback, an abstract socket
    tcp, abstract = socket.socket(), socket.socket(socket.AF_UNIX)
    tcp.bind(("127.0.0.1", 0))
    abstract.bind(f"\0titan-test-{marker}")
    for listener in (tcp, abstract):
        listener.listen(8)
    connect = [("AF_INET", list(tcp.getsockname())), ("AF_UNIX", f"\0titan-test-{marker}")]
    code = f"TARGETS = {targets!r}\nREADS = {reads!r}\nCONNECT = {connect!r}\n{HOSTILE}"
    sandbox = InstallSandbox(settings.install)
    try:
        with sandbox.workspace(tmp_path / "private") as work:
            done = sandbox.run(["/usr/bin/python3", "-I", "-c", code], work, 60)
            assert done.returncode == 0, done.output
            report = json.loads(done.output.strip().splitlines()[-1])
            assert (work / marker).read_text() == "pwned"  # its own work directory only
    finally:
        tcp.close()
        abstract.close()
    assert report["uid"] == settings.install_uid != 0 and report["caps"] == "0" * 16
    assert report["wrote"] == [f"/install/{marker}"], report
    assert report["read"] == [], report
    assert report["reached"] == [], report  # no network at all where packages install
    assert "root" not in report["sees"] and "work" not in report["sees"], report["sees"]
    for path in targets[:-1]:
        assert not Path(path).exists(), f"the sandbox wrote {path} on the host"


RUNAWAY = """\
import os, resource, signal
resource.setrlimit(resource.RLIMIT_NPROC, (200, 200))  # this uid's, so the host is safe
if os.fork() == 0:  # a spawner that outruns a list-then-kill: it forks while being killed
    os.setsid()
    while True:
        try:
            if os.fork() == 0:
                signal.pause()
        except OSError:
            pass
print("started")
"""


def test_without_bwrap_nothing_the_install_uid_started_outlives_the_step(
        settings: Settings, tmp_path: Path) -> None:
    """TITAN_INSTALL_SANDBOX=user (compose): no PID namespace of its own, so what code at
    install time leaves running, a spawner forking all the while included, is ended by
    kill(-1) as the install uid (a uid of this test's own: nothing else's is near it)."""
    uid = 1_800_000 + uuid.uuid4().int % 100_000
    own = settings.with_(install_sandbox="user", install_uid=uid,
                         cache_dir=tmp_path / "cache")
    sandbox = InstallSandbox(own.install)
    try:
        with sandbox.workspace(tmp_path / "private") as work:
            done = sandbox.run([SYSTEM_PYTHON, "-I", "-c", RUNAWAY], work, 60)
        assert done.returncode == 0 and "started" in done.output, done.output

        def left() -> list[int]:
            return [p.pid for p in psutil.process_iter(["uids", "status"])  # dead: zombies
                    if p.info["uids"] and uid in (p.info["uids"].real, p.info["uids"].saved)
                    and p.info["status"] != psutil.STATUS_ZOMBIE]

        # SIGKILLed, each is gone once the kernel has run its exit: on a loaded machine a
        # moment after the step (a fresh machine's run listed 7 right after it); one that
        # escaped the kill would pause, or fork, forever
        wait_until(lambda: not left(), 30, "the install uid's processes to end")
    finally:
        for _ in range(50):  # whatever a failure left, ended here
            if subprocess.run(["pkill", "-KILL", "-U", str(uid)], check=False).returncode:
                break
            time.sleep(0.1)


def test_with_the_parser_bypassed_a_local_project_still_never_runs(settings: Settings,
                                                                   tmp_path: Path) -> None:
    """Defence in depth: the `===` path line the parser now refuses, handed to pip
    directly, installs nothing and runs no setup.py anywhere on the host."""
    marker = Path(f"/var/tmp/titan-pwned-{uuid.uuid4().hex[:8]}")
    evil = Path(f"/var/tmp/titan-evil-{uuid.uuid4().hex[:8]}")
    evil.mkdir()
    (evil / "setup.py").write_text(EVIL_SETUP.format(marker=str(marker)))
    try:
        line = f"x===/../../../../../../../..{evil}"
        own = settings.with_(cache_dir=tmp_path / "cache")
        with pytest.raises(DependencyError) as refused:
            install_requirements(Requirements((line,), (1,)), own.install)
        assert "pwned" not in refused.value.message
        assert not marker.exists(), "a local project's setup.py ran on the host"
    finally:
        subprocess.run(["rm", "-rf", str(evil), str(marker)], check=False)


# One client cannot hold the API.

@pytest.fixture
def exposed(redis_url: str, plugins_dir: Path, tmp_path: Path, conn) -> Iterator[str]:
    """The API as the manager serves it (waitress with the manager's limits), with a
    queue no worker reads: triggered runs stay queued, so every `?wait` waits."""
    mine = private_settings(redis_url, plugins_dir, tmp_path, api_port=free_port())
    registry = Registry(wired(conn, mine))
    registry.reload()
    app = create_app(wired(conn, mine), registry,
                     Dispatcher(wired(conn, mine), make_celery(mine.broker)))
    mine.api_socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    server, front = tcp_api(app, mine.api)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{mine.api_port}"
    front.stop()
    server.close()


def get(url: str, timeout: float = 5) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        resp.read()
        return resp.status


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_half_open_sockets_and_waiting_triggers_do_not_hold_the_api(exposed: str) -> None:
    host, port = exposed.removeprefix("http://").split(":")
    half_open = []
    try:
        for _ in range(150):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            half_open.append(s)
        with ThreadPoolExecutor(12) as pool:
            triggers = [pool.submit(post, f"{exposed}/plugins/sleeper/trigger?wait=8",
                                    {"event_id": f"hold-{n}-{uuid.uuid4().hex[:6]}",
                                     "topic": "test.v1", "event_type": "sleep"})
                        for n in range(12)]
            # (a 5 s client timeout: before, these waited for the runs or forever)
            assert get(f"{exposed}/plugins") == 200
            assert get(f"{exposed}/openapi.json") == 200
            answers = [t.result() for t in triggers]
        assert all(status == 202 for status, _ in answers), answers
        at_once = [body for _, body in answers if not body["waited"]]
        assert len(at_once) == 12 - 4, answers  # TITAN_API_WAITERS (4) waited, no more
        assert all(body["record"] == f"/invocations/{body['invocation_id']}" for body in at_once)
    finally:
        for s in half_open:
            s.close()


def test_a_head_never_finished_is_answered_408_and_dropped(exposed: str) -> None:
    host, port = exposed.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        answer = s.makefile("rb").read()  # to the end: closed by the server, not by us
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"TITAN_API_HEADER_TIMEOUT_S" in answer


def test_a_huge_body_is_refused_from_its_content_length(exposed: str) -> None:
    """Every time: the answer once came back empty to 2 clients in 100 (the backend closed
    with the body's first bytes unread, and the front lost the 413 it held)."""
    host, port = exposed.removeprefix("http://").split(":")
    answers = []
    for _ in range(100):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      b"\r\nContent-Length: 1073741824\r\n\r\n{")
            answers.append(s.recv(4096))
    assert all(a.startswith(b"HTTP/1.1 413") for a in answers), {a[:60] for a in answers}
    assert b"1073741824 bytes" in answers[0]


# Provenance.

def test_the_managers_own_topics_cannot_be_published(client, api_url: str, bus) -> None:
    forged = {"event_id": f"forged-{uuid.uuid4().hex[:8]}", "topic": "plugins.v1",
              "event_type": "invocation_failed",
              "payload": {"plugin": "echo", "invocation_id": "x", "event_id": "y",
                          "status": "failed", "reason": "forged"}}
    answer = client.post("/events", json=forged)
    assert answer.status_code == 400
    assert answer.json["error"]["details"] == {"field": "topic", "reason": "reserved_topic"}
    assert client.post("/plugins/echo/trigger", json=forged).status_code == 400
    cli = subprocess.run([SYSTEM_PYTHON, str(ROOT / "titan-plugins.py"), "publish", "-e",
                          json.dumps(forged)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TITAN_API_URL": api_url}, check=False)
    assert cli.returncode == 1 and "reserved" in cli.stderr, cli.stderr
    # a dead letter that was a forged failure event is not republished by a replay
    entry = bus.publish(json.dumps({**forged, "hops": 99}))
    assert bus.dead_letter(entry)["reason"] == "hops_exceeded"
    replay = client.post(f"/events/dead/{dead_id(bus, entry)}/replay")
    assert replay.status_code == 400 and "reserved" in replay.json["error"]["message"]
    # nor one that posed as a plugin's result
    posing = bus.publish(json.dumps({"event_id": f"posing-{uuid.uuid4().hex[:8]}",
                                     "topic": "test.v1", "event_type": "ping",
                                     "source": "plugin:echo@0.1.0", "hops": 99}))
    assert bus.dead_letter(posing)["reason"] == "hops_exceeded"
    replay = client.post(f"/events/dead/{dead_id(bus, posing)}/replay")
    assert replay.status_code == 400
    assert replay.json["error"]["details"] == {"field": "source", "reason": "forged_source"}


def dead_id(bus, entry_id: str) -> str:
    for dead_entry, fields in bus.conn.xrevrange(bus.settings.dead_stream, count=500):
        if fields.get(b"entry_id", b"").decode() == entry_id:
            return dead_entry.decode()
    raise AssertionError(f"no dead letter for {entry_id}")


def test_triggers_are_charged_to_their_correlation(settings, conn, registry) -> None:
    mine = settings.with_(fanout_budget=3)
    nobody_reads = mine.with_(task_queue=f"{mine.task_queue}.nobody")
    client = create_app(wired(conn, mine), registry,
                        Dispatcher(wired(conn, nobody_reads),
                                   make_celery(mine.broker))).test_client()
    event = {"event_id": f"budget-{uuid.uuid4().hex[:8]}", "topic": "test.v1",
             "event_type": "ping"}
    statuses = [client.post("/plugins/echo/trigger", json=event).status_code for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    refused = client.post("/plugins/echo/trigger", json=event).json["error"]
    assert refused["code"] == "budget_exceeded" and "new event_id" in refused["message"]


# Bounded disk and store.

def _entry(path: Path, size: int, age_s: float) -> None:
    path.mkdir(parents=True)
    (path / "blob").write_bytes(os.urandom(size))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_the_cache_evicts_least_recently_used_past_its_size(settings, tmp_path: Path) -> None:
    own = settings.with_(cache_dir=tmp_path / "cache", cache_max_bytes=3 * 2**20)
    janitor = CacheJanitor(own.cache)
    old = janitor.min_idle_s + 100
    plugins, deps = own.cache_dir / "plugins", own.cache_dir / "deps"
    _entry(plugins / "sha256-oldest", 2**20, old + 300)
    _entry(deps / "old-deps", 2**20, old + 200)
    _entry(plugins / "sha256-old", 2**20, old + 100)
    _entry(plugins / "sha256-recent", 2**20, 10)  # in use (a run or a prewarmed container)
    _entry(deps / "recent-deps", 2**20, 5)
    evicted = janitor.evict()
    assert evicted == ["sha256-oldest", "old-deps"], evicted
    assert sorted(p.name for p in plugins.iterdir()) == ["sha256-old", "sha256-recent"]
    assert (deps / "recent-deps").is_dir()
    # recently used entries stay even when the cache is still too big
    tiny = CacheJanitor(own.with_(cache_max_bytes=1).cache)
    assert tiny.evict() == ["sha256-old"]
    assert sorted(p.name for p in plugins.iterdir()) == ["sha256-recent"]


def test_bundles_no_kept_version_names_are_deleted(redis_url: str, conn, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    (plugins / "churn").mkdir(parents=True)
    mine = private_settings(redis_url, plugins, tmp_path / "run")
    registry = Registry(wired(conn, mine))
    digests = []
    for n in range(Registry.HISTORY + 3):
        (plugins / "churn" / "plugin.yaml").write_text(
            f"name: churn\nversion: 1.0.{n}\ntriggers: [{{topic: t.v1, event_type: e}}]\n"
            "entrypoint: python main.py\nimage: titan-runtime:py3.11\n")
        (plugins / "churn" / "main.py").write_text(f"print()  # {n}\n")
        registry.reload()
        digests.append(registry.get("churn").digest)
    stored = {k.decode().split(":bundle:", 1)[1]
              for k in conn.scan_iter(match=f"{mine.key_prefix}:bundle:*")}
    kept = {e.digest for e in registry.versions("churn")}
    assert stored == kept == set(digests[-Registry.HISTORY:]), (stored, kept)
    assert registry.rollback("churn")["to"]["digest"] == digests[-2]
    assert conn.exists(f"{mine.key_prefix}:bundle:{digests[-2]}")
