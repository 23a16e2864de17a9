"""Hot reload, versions and rollback, and plugins that reach any worker host. A private
stack: its own registry namespace, an in-process listener, and a worker started in another
working directory with an empty cache (it has no access to the plugins directory)."""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import redis

from harness import Bus, WorkerProcess, new_id, private_settings, records_of, wait_until, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener
from manager.cli.text import plugin_table, reload_text, versions_text
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.plugins.registry import Registry
from manager.plugins.watch import PluginWatcher

pytestmark = pytest.mark.integration

MANIFEST = """\
name: {name}
version: {version}
triggers:
  - topic: reload.v1
    event_type: {name}
entrypoint: {entrypoint}
image: titan-runtime:py3.11
timeout: 20
resources: {{cpu: "250m", memory: "64Mi"}}
{extra}"""
CODE = """\
import json, os
CODE_VERSION = "{version}"
print(json.dumps({{"topic": "reload.v1", "event_type": "answer",
                  "payload": {{"code": CODE_VERSION, "env": os.environ["PLUGIN_VERSION"]}}}}))
"""


def write_plugin(root: Path, name: str, version: str, extra: str = "",
                 entrypoint: str = "python main.py", requirements: str | None = None) -> None:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "plugin.yaml").write_text(MANIFEST.format(name=name, version=version, extra=extra,
                                                   entrypoint=entrypoint))
    (d / "main.py").write_text(CODE.format(version=version))
    req = d / "requirements.txt"
    if requirements is None:
        req.unlink(missing_ok=True)
    else:
        req.write_text(requirements)


@dataclass
class Stack:
    settings: Settings
    conn: redis.Redis
    registry: Registry
    bus: Bus
    plugins: Path
    client: object
    worker_log: Path

    def answer(self, name: str, timeout: float = 60) -> dict:
        event_id = new_id()
        self.bus.publish({"event_id": event_id, "topic": "reload.v1", "event_type": name})
        return self.bus.result_of(event_id, timeout)


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    plugins = tmp_path_factory.mktemp("reload-plugins")
    write_plugin(plugins, "versioned", "1.0.0")
    settings = private_settings(redis_url, plugins, tmp_path_factory.mktemp("reload-run"))
    conn = redis.Redis.from_url(redis_url)
    registry = Registry(wired(conn, settings))
    registry.reload()
    dispatcher = Dispatcher(wired(conn, settings), make_celery(settings.broker))
    listener = Listener(wired(redis.Redis.from_url(redis_url), settings),
                        Registry(wired(redis.Redis.from_url(redis_url), settings)), dispatcher)
    elsewhere = Path(tempfile.mkdtemp(prefix="titan-elsewhere-"))
    remote = settings.with_(cache_dir=elsewhere / "empty-cache")  # nothing shared on disk
    worker = WorkerProcess(remote, "remote", concurrency=2, cwd=elsewhere)
    thread = threading.Thread(target=listener.run, daemon=True)
    try:
        worker.wait_ready(conn)
        thread.start()
        yield Stack(settings, conn, registry, Bus(conn, settings), plugins,
                    create_app(wired(conn, settings), registry, dispatcher).test_client(),
                    worker.log)
    finally:
        listener.stop()
        worker.stop()
        shutil.rmtree(elsewhere, ignore_errors=True)
        shutil.rmtree(settings.cache_dir, ignore_errors=True)


def test_a_worker_elsewhere_runs_a_plugin_it_never_had_on_disk(stack: Stack) -> None:
    write_plugin(stack.plugins, "ghost", "0.3.0")
    assert [a["name"] for a in stack.registry.reload()["added"]] == ["ghost"]
    shutil.rmtree(stack.plugins / "ghost")  # the only copy is now the bundle in Redis
    result = stack.answer("ghost")
    assert result["payload"] == {"code": "0.3.0", "env": "0.3.0"}
    assert stack.registry.reload()["removed"] == ["ghost"]


def test_reload_mid_stream_runs_each_event_on_one_whole_version(stack: Stack) -> None:
    write_plugin(stack.plugins, "versioned", "1.0.0")
    stack.registry.reload()
    before = [new_id() for _ in range(12)]
    after = [new_id() for _ in range(12)]
    for event_id in before:
        stack.bus.publish({"event_id": event_id, "topic": "reload.v1",
                           "event_type": "versioned"})
    write_plugin(stack.plugins, "versioned", "2.0.0")
    changes = stack.registry.reload()
    assert [(u["from"]["version"], u["to"]["version"]) for u in changes["updated"]] == [
        ("1.0.0", "2.0.0")]
    for event_id in after:
        stack.bus.publish({"event_id": event_id, "topic": "reload.v1",
                           "event_type": "versioned"})
    answers = {event_id: stack.bus.result_of(event_id)["payload"] for event_id in before + after}
    digests = {e.version: e.digest for e in stack.registry.versions("versioned")}
    records = {r["event_id"]: r for r in records_of(stack.conn, stack.settings, "versioned", 500)}
    for event_id, payload in answers.items():
        assert payload["code"] == payload["env"] in ("1.0.0", "2.0.0")  # never a mix
        assert records[event_id]["digest"] == digests[payload["code"]]
        if event_id in after:
            assert payload["code"] == "2.0.0"


def pooled_run(stack: Stack) -> dict:
    """A run of `pooled` under light load: the next one waits until the container that
    ran this one is gone, its replacement is ready and every prewarmed container the
    engine lists is ready (the worker logs each one that is), so a run that then goes
    cold is the pool's fault, not the test's timing."""
    def ready_ones() -> list[str]:
        return re.findall(r"prewarmed pooled ([0-9a-f]{12}): ready",
                          stack.worker_log.read_text())

    before = len(ready_ones())
    answer = stack.answer("pooled")
    (record,) = [r for r in records_of(stack.conn, stack.settings, "pooled", 50)
                 if r["event_id"] == answer["causation_id"]]

    def ready() -> bool:
        ids = {c.id[:12] for c in docker.from_env().containers.list(all=True, sparse=True,
               filters={"label": [f"titan.instance={stack.settings.instance}",
                                  "titan.plugin=pooled"]})}
        logged = ready_ones()
        return (record["container_id"][:12] not in ids and len(logged) > before
                and ids <= set(logged))

    wait_until(ready, 30, "the run's container to go and its replacement to be ready")
    return answer


def test_a_reload_switches_the_prewarmed_pool_to_the_new_version(stack: Stack) -> None:
    write_plugin(stack.plugins, "pooled", "1.0.0")
    stack.registry.reload()
    old = [pooled_run(stack) for _ in range(4)]  # the pool holds 1.0.0
    write_plugin(stack.plugins, "pooled", "2.0.0")
    stack.registry.reload()
    new = [pooled_run(stack) for _ in range(6)]
    assert {a["payload"]["code"] for a in old} == {"1.0.0"}
    assert {a["payload"]["code"] for a in new} == {"2.0.0"}  # never old code after a reload
    # the pool served each version: each of the worker's two processes starts a version
    # cold at most once, then its own pool has a ready container for every later run
    runs = records_of(stack.conn, stack.settings, "pooled", 50)
    assert sum(bool(r["warm"]) for r in runs if r["version"] == "1.0.0") >= 2
    assert sum(bool(r["warm"]) for r in runs if r["version"] == "2.0.0") >= 4


@pytest.mark.parametrize(("broken", "error"), [
    ({"extra": "privileged: true\n"}, "privileged: unknown key"),
    ({"entrypoint": "python missing.py"}, "does not exist"),
    ({"requirements": "titan-no-such-package-xyz==9.9.9\n"}, "requirements.txt"),
])
def test_a_broken_update_keeps_the_old_version_serving(stack: Stack, broken: dict,
                                                       error: str) -> None:
    write_plugin(stack.plugins, "versioned", "2.0.0")
    stack.registry.reload()
    write_plugin(stack.plugins, "versioned", "3.0.0", **broken)
    changes = stack.registry.reload()
    (rejected,) = changes["rejected"]
    assert rejected["name"] == "versioned" and rejected["serving"]["version"] == "2.0.0"
    assert any(error in e for e in rejected["errors"]), rejected
    assert reload_text(changes).startswith("rejected: versioned (serving 2.0.0 (")
    shown = stack.client.get("/plugins/versioned").json
    assert shown["status"] == "loaded" and shown["version"] == "2.0.0"
    listed = plugin_table(stack.client.get("/plugins").json).splitlines()
    assert any(re.match(r"versioned\s+loaded, edit REJECTED\s+2\.0\.0\s", ln)
               for ln in listed), listed
    assert any(error in e for e in shown["errors"])
    assert stack.answer("versioned")["payload"]["code"] == "2.0.0"


def test_rollback_restores_the_earlier_digest_until_the_directory_changes(stack: Stack) -> None:
    write_plugin(stack.plugins, "versioned", "1.0.0")
    stack.registry.reload()
    v1 = stack.registry.get("versioned").digest
    write_plugin(stack.plugins, "versioned", "2.0.0")
    stack.registry.reload()
    v2 = stack.registry.get("versioned").digest
    resp = stack.client.post("/plugins/versioned/rollback", json={"version": "1.0.0"})
    assert resp.status_code == 200 and resp.json["to"]["digest"] == v1
    shown = stack.client.get("/plugins/versioned").json
    assert shown["digest"] == v1
    listed = plugin_table(stack.client.get("/plugins").json).splitlines()
    assert any(ln.startswith("versioned") and "1.0.0 (rolled back)" in ln for ln in listed)
    assert {v["digest"] for v in shown["versions"]} >= {v1, v2}
    serving = [ln for ln in versions_text(shown).splitlines() if ln.startswith("*")]
    assert len(serving) == 1 and serving[0].split()[1:3] == ["1.0.0", v1[7:19]], serving
    assert stack.answer("versioned")["payload"]["code"] == "1.0.0"
    stack.registry.reload()  # the directory still holds 2.0.0: the rollback stays
    assert stack.registry.get("versioned").digest == v1
    back = stack.client.post("/plugins/versioned/rollback", json={"version": "2.0.0"})
    assert back.json["to"]["digest"] == v2
    missing = stack.client.post("/plugins/versioned/rollback", json={"version": "9.9.9"})
    assert missing.status_code == 404 and missing.json["error"]["code"] == "version_not_found"


def test_only_the_last_five_versions_are_kept(stack: Stack) -> None:
    for minor in range(7):
        write_plugin(stack.plugins, "versioned", f"4.{minor}.0")
        changes = stack.registry.reload()
    assert re.fullmatch(r"updated: versioned 4\.5\.0 \(\w{12}\) -> 4\.6\.0 \(\w{12}\)",
                        reload_text(changes)), reload_text(changes)
    kept = [e.version for e in stack.registry.versions("versioned")]
    assert kept == ["4.6.0", "4.5.0", "4.4.0", "4.3.0", "4.2.0"]


def test_removing_a_plugin_stops_new_dispatch(stack: Stack) -> None:
    write_plugin(stack.plugins, "doomed", "1.0.0")
    stack.registry.reload()
    assert stack.answer("doomed")["payload"]["code"] == "1.0.0"
    shutil.rmtree(stack.plugins / "doomed")
    assert stack.registry.reload()["removed"] == ["doomed"]
    event_id = new_id()
    entry = stack.bus.publish({"event_id": event_id, "topic": "reload.v1",
                               "event_type": "doomed"})
    wait_until(lambda: stack.conn.xpending(stack.settings.event_stream,
                                           stack.settings.consumer_group)["pending"] == 0
               and stack.conn.xinfo_groups(stack.settings.event_stream)[0]
               ["last-delivered-id"].decode() >= entry, 30, "the listener to pass the event")
    runs = records_of(stack.conn, stack.settings, "doomed", 50)
    assert all(r["event_id"] != event_id for r in runs)


def test_watch_reloads_on_file_changes(stack: Stack) -> None:
    watcher = PluginWatcher(stack.plugins, stack.registry.reload, debounce_s=0.3)
    watcher.start()
    try:
        write_plugin(stack.plugins, "watched", "1.0.0")
        wait_until(lambda: stack.registry.get("watched"), 30, "the watcher's reload")
        write_plugin(stack.plugins, "watched", "1.1.0")
        wait_until(lambda: stack.registry.get("watched").version == "1.1.0", 30,
                   "the update")
    finally:
        watcher.stop()
        shutil.rmtree(stack.plugins / "watched", ignore_errors=True)
        stack.registry.reload()


def test_the_replaced_version_is_kept_even_if_loaded_before_history(stack: Stack) -> None:
    write_plugin(stack.plugins, "versioned", "5.0.0")
    stack.registry.reload()
    old = stack.registry.get("versioned").digest
    stack.conn.delete(f"{stack.settings.key_prefix}:plugin:versioned:versions")
    write_plugin(stack.plugins, "versioned", "5.1.0")
    stack.registry.reload()
    assert [e.version for e in stack.registry.versions("versioned")] == ["5.1.0", "5.0.0"]
    assert stack.registry.rollback("versioned")["to"]["digest"] == old
