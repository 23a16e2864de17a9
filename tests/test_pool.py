"""The prewarm pool gives way to what is used now: with more plugins than slots, a plugin
that becomes hot gets prewarmed containers, taken from the idle ones of the plugins used
least recently (titan_prewarm_evictions_total)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from hoststate import own_name

from harness import WorkerProcess, new_id, private_settings, record_of, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.core.events import Event
from manager.plugins.registry import Registry

pytestmark = pytest.mark.integration
MANIFEST = """\
name: {name}
version: 1.0.0
triggers: [{{topic: pool.v1, event_type: {name}}}]
entrypoint: python main.py
image: titan-runtime:py3.11
resources: {{cpu: "250m", memory: "64Mi"}}
"""
MAIN = 'print(\'{"topic": "pool.v1", "event_type": "done", "payload": {}}\')\n'


@pytest.fixture
def many(redis_url: str, conn, tmp_path: Path) -> Iterator[dict]:
    plugins = tmp_path / "plugins"
    names = [f"p{n:02d}" for n in range(13)]
    for name in names:
        (plugins / name).mkdir(parents=True)
        (plugins / name / "plugin.yaml").write_text(MANIFEST.format(name=name))
        (plugins / name / "main.py").write_text(MAIN)
    (tmp_path / "run").mkdir()
    # run ids of its own: the account a test makes inside them must not stop other
    # tests' workers from starting (a worker refuses a range the host uses)
    mine: Settings = private_settings(redis_url, plugins, tmp_path / "run", prewarm_max=4,
                                      prewarm_size=1, run_ids="2400000-2409999")
    registry = Registry(wired(conn, mine))
    registry.reload()
    worker = WorkerProcess(mine, f"pool{uuid.uuid4().hex[:6]}", concurrency=1)
    try:
        worker.wait_ready(conn)
        yield {"settings": mine, "registry": registry, "names": names,
               "dispatcher": Dispatcher(wired(conn, mine), make_celery(mine.broker))}
    finally:
        worker.stop()
        shutil.rmtree(mine.cache_dir, ignore_errors=True)


def run(many: dict, conn, name: str) -> dict:
    """One run of plugin `name`, to its end (one at a time: light load)."""
    entry = many["registry"].get(name)
    inv, _ = many["dispatcher"].dispatch(Event(new_id(name), "pool.v1", name), entry, "api")
    return wait_until(lambda: (r := record_of(conn, many["settings"], inv))
                      and r["status"] == "succeeded" and r, 60, f"a run of {name}")


def test_a_plugin_that_becomes_hot_gets_warm_runs(many: dict, conn) -> None:
    *used, hot = many["names"]
    for _ in range(3):  # twelve plugins in use, more than the pool's four slots
        for name in used:
            run(many, conn, name)
    warm = []
    for _ in range(12):  # the hot plugin, at light load: each run's replacement is ready
        record = run(many, conn, hot)
        warm.append(record["warm"])
        wait_until(lambda r=record: replaced(many, hot, r["container_id"]), 30,
                   "the pool to settle after the run")
    assert sum(warm) >= 8, warm  # before: the first plugins kept every slot, 1 of 12


def replaced(many: dict, name: str, used: str) -> bool:
    """The run's container is gone, and the pool holds a started prewarmed one of `name`
    (a replacement, or a first one if there was no room for it before): under load, one
    only created yet would make the next run cold for a reason this test is not about."""
    found = {c.id: c.attrs for c in docker.from_env().containers.list(
             all=True, sparse=True,
             filters={"label": [f"titan.instance={many['settings'].instance}",
                                f"titan.plugin={name}"]})}
    return used not in found and any(
        (attrs.get("Labels") or {}).get("titan.pool") == "1" and attrs.get("State") == "running"
        for attrs in found.values())


def test_a_prewarmed_container_whose_uid_the_host_gives_away_is_never_used(
        many: dict, conn) -> None:
    """A local account made with the uid of a live prewarmed container (`useradd -u`,
    then `kill -0` on its zygote would succeed): the pool removes that container instead
    of handing it to a run, and /health names the conflict."""
    from manager.api.app import create_app

    name = many["names"][0]
    first = run(many, conn, name)
    wait_until(lambda: replaced(many, name, first["container_id"]), 30, "a prewarmed one")
    (pooled,) = [c for c in docker.from_env().containers.list(sparse=True, filters={"label": [
        f"titan.instance={many['settings'].instance}", f"titan.plugin={name}",
        "titan.pool=1"]})]
    uid = int(pooled.attrs["Labels"]["titan.uid"].split(":")[0])
    assert 2400000 <= uid < 2410000, uid  # the fixture's own range (see `many`)
    account = own_name("hostile")
    subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-u", str(uid), account],
                   check=True)
    try:
        second = run(many, conn, name)
        assert second["container_id"] != pooled.id
        wait_until(lambda: not docker.from_env().containers.list(
            all=True, sparse=True, filters={"id": pooled.id}), 30, "the container to go")
        client = create_app(wired(conn, many["settings"]), many["registry"],
                            many["dispatcher"]).test_client()
        health = wait_until(lambda: (h := client.get("/health").json)["run_ids"]["conflicts"]
                            and h, 15, "the heartbeat to name the conflict")
        assert health["run_ids"]["ok"] is False
        assert health["run_ids"]["conflicts"] == [f"/etc/passwd: {account} has id {uid}"]
    finally:
        subprocess.run(["userdel", account], check=True)
