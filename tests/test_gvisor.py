"""The gVisor tier (`isolation: gvisor`): chosen per manifest or for every plugin by the
operator, carried on the run request, run under the engine's runsc runtime with every
container protection as before; an engine without the runtime is named at reload and a run
there fails at once with the fix, never after retries. (The hostile suite runs on gVisor
lanes too: tests/test_hostile.py.)"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import WorkerProcess, new_id, private_settings, record_of, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.core.beats import WorkerBeat
from manager.core.contract import make_celery
from manager.core.events import Event
from manager.core.keys import Keys
from manager.core.runs import Isolation
from manager.plugins.registry import Registry

MANIFEST = """\
name: {name}
version: 1.0.0
triggers: [{{topic: gv.v1, event_type: {name}}}]
entrypoint: python main.py
image: titan-runtime:py3.11
resources: {{cpu: "250m", memory: "64Mi"}}
{extra}"""
MAIN = """\
import json
print(json.dumps({"topic": "gv.v1", "event_type": "kernel",
                  "payload": {"kernel": open("/proc/version").read().strip()}}))
"""


def plugins(root: Path) -> Path:
    for name, extra in (("plain", ""), ("boxed", "isolation: gvisor\n")):
        (root / name).mkdir(parents=True)
        (root / name / "plugin.yaml").write_text(MANIFEST.format(name=name, extra=extra))
        (root / name / "main.py").write_text(MAIN)
    return root


@pytest.fixture
def setup(redis_url: str, conn, tmp_path: Path) -> Iterator[dict]:
    (tmp_path / "run").mkdir()
    mine = private_settings(redis_url, plugins(tmp_path / "plugins"), tmp_path / "run")
    yield {"settings": mine, "registry": Registry(wired(conn, mine))}
    shutil.rmtree(mine.cache_dir, ignore_errors=True)


def test_the_manifest_chooses_and_the_operator_can_force_gvisor(setup: dict) -> None:
    registry, settings = setup["registry"], setup["settings"]
    registry.reload()
    event = Event(new_id(), "gv.v1", "x")
    plain, boxed = registry.get("plain"), registry.get("boxed")
    assert plain.request(event, settings.plugin, "api").isolation is Isolation.CONTAINER
    assert boxed.request(event, settings.plugin, "api").isolation is Isolation.GVISOR
    forced = settings.with_(isolation="gvisor")
    assert plain.request(event, forced.plugin, "api").isolation is Isolation.GVISOR
    again = type(plain.request(event, settings.plugin, "api")).from_dict(
        boxed.request(event, settings.plugin, "api").to_dict())
    assert again.isolation is Isolation.GVISOR  # survives the task message


@pytest.mark.integration
def test_a_gvisor_plugin_runs_on_a_user_space_kernel(setup: dict, conn) -> None:
    settings, registry = setup["settings"], setup["registry"]
    registry.reload()
    worker = WorkerProcess(settings, f"gv{uuid.uuid4().hex[:6]}", concurrency=1)
    dispatcher = Dispatcher(wired(conn, settings), make_celery(settings.broker))
    try:
        worker.wait_ready(conn)
        kernels = {}
        for name in ("plain", "boxed", "boxed"):  # the second boxed run may be prewarmed
            inv, _ = dispatcher.dispatch(Event(new_id(), "gv.v1", name), registry.get(name),
                                         "api")
            record = wait_until(lambda i=inv: (r := record_of(conn, settings, i))
                                and r["status"] not in ("pending", "queued", "running")
                                and r, 120, f"the {name} run")
            assert record["status"] == "succeeded", (record["reason"], record["stderr"])
            kernels.setdefault(name, set()).add(record["results"][0]["payload"]["kernel"])
        sentries_named_beside(conn, settings, registry, dispatcher)
    finally:
        worker.stop()
    host = Path("/proc/version").read_text().strip()
    assert kernels["plain"] == {host}
    assert all(host not in k for k in kernels["boxed"]), kernels


def sentries_named_beside(conn, settings, registry, dispatcher) -> None:
    """runsc runs every Sentry as host uid 65534 (not configurable: workers.sentries), so
    another process of that uid (a hostile `nobody`) can signal a gVisor run: /health
    names it, and never a Sentry (a prewarmed boxed run's is alive). Other programs'
    processes of that uid may be named beside it: only ours is judged."""
    from manager.api.app import create_app

    client = create_app(wired(conn, settings), registry, dispatcher).test_client()
    hostile = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                "sleep", "300"])
    ours = f"pid {hostile.pid} (sleep)"
    try:
        def gvisor() -> dict | None:
            part = client.get("/health").json["gvisor"]
            found = [n.split(": ", 1)[1] for n in part["sentry_neighbours"]]
            return part if ours in found else None

        named = wait_until(gvisor, 20, "the heartbeat to name the process")
        assert named["ok"] is False
        sentries = subprocess.run(["pgrep", "-u", "65534", "-f", "^runsc-sandbox"],
                                  capture_output=True, text=True, check=False).stdout.split()
        assert sentries, "no Sentry was alive to be told apart"
        assert not {f"pid {pid} " for pid in sentries} & {
            n.split(": ", 1)[1].split("(")[0] for n in named["sentry_neighbours"]}
    finally:
        hostile.kill()
        hostile.wait()


@pytest.mark.integration
def test_an_engine_without_the_runtime_is_named_at_reload_and_fails_the_run_at_once(
        setup: dict, conn) -> None:
    settings = setup["settings"].with_(gvisor_runtime="runsc-absent")
    registry = Registry(wired(conn, settings))
    worker = WorkerProcess(settings, f"nogv{uuid.uuid4().hex[:6]}", concurrency=1,
                           TITAN_GVISOR_RUNTIME="runsc-absent")
    try:
        worker.wait_ready(conn)
        wait_until(lambda: registry.worker_engines().runtimes, 30, "the worker's runtimes")
        changes = registry.reload()
        warned = {w["name"]: w["warnings"] for w in changes["warnings"]}
        assert "boxed" in warned and "plain" not in warned, changes
        assert "Docker runtime 'runsc-absent', which no live worker's engine has" \
            in warned["boxed"][0]
        inv, _ = Dispatcher(wired(conn, settings), make_celery(settings.broker)).dispatch(
            Event(new_id(), "gv.v1", "boxed"), registry.get("boxed"), "api")
        record = wait_until(lambda: (r := record_of(conn, settings, inv))
                            and r["status"] not in ("pending", "queued", "running") and r,
                            120, "the run")
    finally:
        worker.stop()
    assert record["status"] == "failed" and record["attempts"] == 1, record
    assert "isolation: gvisor needs the Docker runtime 'runsc-absent'" in record["reason"]
    assert "make up does it" in record["reason"]


def test_a_beat_carries_the_engines_runtimes(conn, settings) -> None:
    keys = Keys(f"{settings.key_prefix}b{uuid.uuid4().hex[:6]}")
    WorkerBeat("w@h", 1, True, runtimes=("runc", "runsc")).save(conn, keys)
    assert WorkerBeat.all(conn, keys)[0].runtimes == ("runc", "runsc")
