"""Containment at every boundary (SPEC §4), attacked from outside as a plugin author or an
event producer would: path swaps racing the checks, crafted bundles, sparse files, a
runaway fan-out, forged provenance, limits from a bundle, nested results, /dev/shm."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import resource
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from hoststate import own_prefix
from prometheus_client import REGISTRY

from harness import (
    Bus,
    WorkerProcess,
    exchange,
    new_id,
    private_settings,
    records_of,
    wait_until,
    wired,
)
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.group import ensure_group
from manager.bus.listener import Listener
from manager.core.contract import make_celery
from manager.core.errors import BundleError, PermissionDenied
from manager.core.events import Event
from manager.core.keys import Keys
from manager.core.runs import RunRequest, RunUser
from manager.plugins.installer import adopt
from manager.plugins.loader import build_bundle, load_plugin
from manager.plugins.permissions import open_payload_path
from manager.plugins.registry import Registry
from manager.plugins.safefs import TreeFile
from workers.plugin_cache import PluginCache

pytestmark = pytest.mark.integration
SECRET = "TOP-SECRET-a1b2c3"
JUDGE = RunUser(2000123, 2000000)  # a run's identity: the kernel judges what it opens


@pytest.fixture
def secret_dir() -> Iterator[Path]:
    """A root-only directory outside every allowed root, like /root."""
    path = Path(tempfile.mkdtemp(prefix=own_prefix("secret"), dir="/var/tmp"))
    path.chmod(0o700)
    for name in ("f.txt", "decoy.txt"):
        (path / name).write_text(SECRET)
        (path / name).chmod(0o600)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Swapper(threading.Thread):
    """Exchanges two names atomically (renameat2 RENAME_EXCHANGE) in a tight loop."""

    def __init__(self, a: Path, b: Path) -> None:
        super().__init__(daemon=True)
        self.a, self.b = a, b
        self.stopping = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            exchange(str(self.a), str(self.b))
            self.swaps += 1

    def __enter__(self) -> Swapper:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.join(5)
        if self.swaps % 2:
            exchange(str(self.a), str(self.b))  # leave the names as they were


# Payload path: check and use the same object.

def test_payload_path_swapped_during_the_check_never_reads_the_target(
        settings, files_dir, secret_dir, bus, conn, stack) -> None:
    race = files_dir / new_id("race")
    (race / "box").mkdir(parents=True)
    (race / "box" / "f.txt").write_text("decoy")
    (race / "alt").symlink_to(secret_dir)
    path, globs = str(race / "box" / "f.txt"), [f"{files_dir}/**"]
    seen = {"decoy": 0, "rejected": 0}
    stage = Path(tempfile.mkdtemp(prefix="titan-stage-"))
    try:
        with Swapper(race / "box", race / "alt") as swapper:
            for n in range(4000):  # 400 at least, and until both sides were seen (how often
                if n >= 400 and min(seen.values()) > 0:  # each wins is the machine's load's)
                    break
                try:
                    checked = open_payload_path({"path": path}, globs, settings.fs, JUDGE)
                except PermissionDenied:
                    seen["rejected"] += 1
                    continue
                run_dir = stage / str(n)
                run_dir.mkdir()
                try:
                    staged = checked.stage(run_dir / "payload", JUDGE)
                finally:
                    checked.close()
                assert staged and Path(staged).read_text() == "decoy"
                seen["decoy"] += 1
            runs = []
            for _ in range(10):  # and through the whole pipeline, with the swaps going on
                event_id = new_id("race")
                bus.publish({"event_id": event_id, "topic": "hostile.v1", "event_type": "attack",
                             "payload": {"attack": "read_paths", "paths": [path], "path": path}})
                runs.append(event_id)
            caused = [bus.result_of(e, timeout=120) for e in runs]
        assert swapper.swaps > 400
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(race, ignore_errors=True)
    assert seen["decoy"] > 0 and seen["rejected"] > 0, seen
    for event in caused:
        assert SECRET not in str(event)
        got = event["payload"].get("results", {}).get(path) or event["payload"]["status"]
        assert got in ("read:decoy", "ENOENT", "rejected"), event


# Bundles: read through descriptors.

def test_a_folder_swapped_during_reload_never_lands_in_a_bundle(settings, tmp_path,
                                                                secret_dir) -> None:
    plugin = tmp_path / "racy"
    (plugin / "data").mkdir(parents=True)
    (plugin / "plugin.yaml").write_text(
        "name: racy\nversion: 1.0.0\ntriggers: [{topic: a, event_type: b}]\n"
        "entrypoint: python main.py\nimage: titan-runtime:py3.11\n")
    (plugin / "main.py").write_text("print()\n")
    (plugin / "data" / "decoy.txt").write_text("decoy")
    (tmp_path / "link").symlink_to(secret_dir)
    outcomes = {"loaded": 0, "invalid": 0}
    with Swapper(plugin / "data", tmp_path / "link"):
        for _ in range(2000):  # until each side of the race has won a few times
            if min(outcomes.values()) >= 3:
                break
            entry, bundle = load_plugin(plugin, settings.plugin, install=False)
            if bundle is None:
                outcomes["invalid"] += 1
                assert not entry.runnable and any("symlink" in e or "not a directory" in e
                                                  for e in entry.errors), entry.errors
                continue
            outcomes["loaded"] += 1
            assert SECRET.encode() not in gzip.decompress(bundle)
    assert outcomes["loaded"] > 0 and outcomes["invalid"] > 0, outcomes


def test_a_sparse_3gb_file_is_refused_before_a_byte_is_read(settings, tmp_path) -> None:
    plugin = tmp_path / "sparse"
    plugin.mkdir()
    (plugin / "plugin.yaml").write_text(
        "name: sparse\nversion: 1.0.0\ntriggers: [{topic: a, event_type: b}]\n"
        "entrypoint: python main.py\nimage: titan-runtime:py3.11\n")
    (plugin / "main.py").write_text("print()\n")
    with open(plugin / "big.bin", "wb") as fh:
        fh.truncate(3 * 1024**3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    entry, _ = load_plugin(plugin, settings.plugin, install=False)
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert f"files: big.bin: is {3 * 1024**3} bytes, over the limit" in entry.errors[0], \
        entry.errors
    assert grew_kib < 20 * 1024, f"peak memory grew by {grew_kib} KiB"
    (plugin / "big.bin").unlink()
    with open(plugin / "holey.bin", "wb") as fh:
        fh.truncate(1024 * 1024)  # small, but all hole
    entry, _ = load_plugin(plugin, settings.plugin, install=False)
    assert entry.errors == ("files: holey.bin: is a sparse file; plugins may not hold sparse "
                            "files",)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> tuple[str, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    data = raw.getvalue()
    return "sha256:" + hashlib.sha256(data).hexdigest(), gzip.compress(data)


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x",
            link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def test_crafted_bundles_write_nothing_outside_the_cache(settings, conn, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "private.txt"
    victim.write_text("private")
    victim.chmod(0o600)
    long = "d" * 120
    crafted = {
        "symlink then write through it": [_member("a", tarfile.SYMTYPE, link=str(outside)),
                                           _member("a/private.txt", data=b"overwritten")],
        "dotdot": [_member(f"../../../../..{outside}/dotdot.txt")],
        "absolute": [_member(f"{outside}/absolute.txt")],
        "hardlink": [_member("h", tarfile.LNKTYPE, link=str(victim))],
        "device": [_member("dev", tarfile.CHRTYPE)],
        "fifo": [_member("fifo", tarfile.FIFOTYPE)],
        "long names and symlinks": [
            _member("/".join([long] * 8), tarfile.DIRTYPE),
            _member("/".join([long] * 8) + "/l", tarfile.SYMTYPE,
                    link="/".join([".."] * 8) + str(outside)),
            _member("/".join([long] * 8) + "/l/private.txt", data=b"overwritten")],
        "a name that is not UTF-8": [_member("\udcff\udcfe.py")],
        "a file, then a directory of the same name": [_member("a"), _member("a/b")],
        "a directory, then a file of the same name": [_member("a", tarfile.DIRTYPE),
                                                      _member("a")],
    }
    cache = PluginCache(Registry(wired(conn, settings)), settings.cache)
    for what, members in crafted.items():
        digest, bundle = _tar(members)
        conn.set(f"{settings.key_prefix}:bundle:{digest}", bundle)
        with pytest.raises(BundleError, match="refused") as refused:
            cache.code_dir(digest)
        assert "internal" not in refused.value.message and len(refused.value.message) < 500
        assert not (settings.cache_dir / "plugins" / digest.replace(":", "-")).exists(), what
    assert sorted(p.name for p in outside.iterdir()) == ["private.txt"]
    assert victim.read_text() == "private" and oct(victim.stat().st_mode)[-3:] == "600"
    leftovers = [p for p in (settings.cache_dir / "plugins").iterdir()
                 if not p.name.startswith("sha256-")]
    assert not leftovers
    for forged in ("../../etc", "sha256:../../x", "sha256:" + "0" * 63, ""):
        with pytest.raises(BundleError, match="invalid digest"):
            cache.code_dir(forged)
    real_digest, _ = _tar([_member("main.py")])
    conn.set(f"{settings.key_prefix}:bundle:{real_digest}", _tar([_member("other.py")])[1])
    with pytest.raises(BundleError, match="does not match"):
        cache.code_dir(real_digest)


def test_adopting_an_installed_tree_never_follows_symlinks(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("private")
    victim.chmod(0o600)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "link").symlink_to(victim)
    (tree / "mod.py").write_text("x = 1")
    (tree / "mod.py").chmod(0o600)
    adopt(tree)
    assert oct(victim.stat().st_mode)[-3:] == "600"
    assert oct((tree / "mod.py").stat().st_mode)[-3:] == "644"
    assert not (tree / "link").exists() and not (tree / "link").is_symlink()


# Fan-out budget.

@pytest.fixture
def budget_stack(redis_url, plugins_dir, files_dir, tmp_path, conn) -> Iterator[dict]:
    mine = private_settings(redis_url, plugins_dir, tmp_path, fanout_budget=10,
                            allowed_roots=(files_dir,))
    registry = Registry(wired(conn, mine))
    registry.reload()
    listener = Listener(wired(redis.Redis.from_url(redis_url), mine), registry,
                        Dispatcher(wired(conn, mine), make_celery(mine.broker)))
    worker = WorkerProcess(mine, "budget", concurrency=2)
    thread = threading.Thread(target=listener.run, daemon=True)
    try:
        worker.wait_ready(conn)
        thread.start()
        yield {"settings": mine, "bus": Bus(conn, mine)}
    finally:
        listener.stop()
        worker.stop()
        shutil.rmtree(mine.cache_dir, ignore_errors=True)


def test_one_event_cannot_turn_into_more_runs_than_its_budget(budget_stack, conn) -> None:
    mine, bus = budget_stack["settings"], budget_stack["bus"]
    rejected = REGISTRY.get_sample_value("titan_events_rejected_total",
                                         {"reason": "budget_exceeded"}) or 0
    root = new_id("fan")
    bus.publish({"event_id": root, "topic": "fanout.v1", "event_type": "spawn"})
    # 1 + 3 + 6 runs fit in 10; of the 9 + 18 events that follow, 21 are over budget.
    dead = lambda: [e for _, e in conn.xrange(mine.dead_stream)  # noqa: E731
                    if b'"correlation_id":"' + root.encode() in e[b"event"]]
    wait_until(lambda: len(dead()) == 21, 180, "21 dead letters")
    runs = [r for r in records_of(conn, mine, "fanout", 1000)]
    wait_until(lambda: all(r["status"] == "succeeded" for r in records_of(conn, mine, "fanout"))
               and len(records_of(conn, mine, "fanout")) == 10, 60, "10 finished runs")
    assert len(records_of(conn, mine, "fanout", 1000)) == 10, runs
    assert {e[b"reason"] for e in dead()} == {b"budget_exceeded"}
    assert b"used its budget of 10 runs" in dead()[0][b"detail"]
    assert REGISTRY.get_sample_value("titan_events_rejected_total",
                                     {"reason": "budget_exceeded"}) == rejected + 21


def test_a_redelivered_entry_is_charged_once(redis_url, plugins_dir, tmp_path, conn) -> None:
    """A stream entry handled again (reclaimed after a crash, or delivered again) is not
    charged again, so it is never dead-lettered as over budget after its plugin ran."""
    mine = private_settings(redis_url, plugins_dir, tmp_path, fanout_budget=1)
    registry = Registry(wired(conn, mine))
    registry.reload()
    listener = Listener(wired(redis.Redis.from_url(redis_url), mine), registry,
                        Dispatcher(wired(conn, mine),
                                   make_celery(mine.broker)))  # no worker: runs wait
    ensure_group(conn, mine.stream)
    event_id = new_id("again")
    entry = Bus(conn, mine).publish({"event_id": event_id, "topic": "test.v1",
                                     "event_type": "ping"})
    ((_, [(entry_id, fields)]),) = conn.xreadgroup(mine.consumer_group, "test",
                                                    {mine.event_stream: ">"}, count=1)
    assert entry_id.decode() == entry
    for _ in range(3):  # the first delivery, then two more of the same entry
        listener.handle(entry, fields)
    assert conn.xlen(mine.dead_stream) == 0, conn.xrange(mine.dead_stream)
    assert int(conn.get(Keys(mine.key_prefix).budget(event_id))) == 1
    assert [r["event_id"] for r in records_of(conn, mine, "echo")] == [event_id]


# Limits come from the registry, clamped by the worker.

def test_the_worker_applies_the_registrys_limits_clamped_to_its_maxima(
        settings, conn, registry, plugins_dir) -> None:
    mine = settings.with_(task_queue=f"{settings.task_queue}.limits")
    worker = WorkerProcess(mine, "limits", concurrency=1, TITAN_MAX_MEMORY_BYTES=str(64 * 1024**2))
    probe = registry.get("probe")
    files = [TreeFile(p.name, p.read_bytes(), False) for p in sorted(
        (plugins_dir / "probe").iterdir()) if p.is_file()]
    greedy = [f if f.path != "plugin.yaml" else TreeFile(
        f.path, f.data.replace(b'memory: "96Mi"', b'memory: "2Gi"'), False) for f in files]
    digest, bundle = build_bundle(greedy)
    conn.set(f"{settings.key_prefix}:bundle:{digest}", bundle)
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    bus = Bus(conn, settings)
    try:
        worker.wait_ready(conn)
        answers = {}
        for label, digest_used in (("registry", probe.digest), ("greedy bundle", digest)):
            event = Event(new_id("limits"), "test.v1", "probe", {"port": "1"})
            request = replace(probe, digest=digest_used).request(event, settings.plugin, "api")
            dispatcher.records.create(_record(request), 1e9)
            dispatcher.send(request)
            answers[label] = bus.result_of(event.event_id, timeout=120)["payload"]
    finally:
        worker.stop()
    # The manifest (and the greedy bundle's plugin.yaml) ask for 96Mi and 2Gi; this
    # worker's maximum is 64Mi.
    assert int(answers["registry"]["memory_limit"]) == 64 * 1024**2
    assert int(answers["greedy bundle"]["memory_limit"]) == 64 * 1024**2


def _record(request: RunRequest):
    from manager.core.records import InvocationRecord, Status

    return InvocationRecord.from_request(request, Status.PENDING, 0.0)


# Provenance and shapes.

def test_external_producers_cannot_pose_as_plugins(settings, conn, registry, dispatcher,
                                                   bus) -> None:
    client = create_app(wired(conn, settings), registry, dispatcher).test_client()
    forged = {"event_id": new_id(), "topic": "fs.v1", "event_type": "file_created",
              "source": "plugin:file_watcher@1.0.0", "causation_id": "made-up", "hops": 3}
    for url in ("/events", "/plugins/echo/trigger"):
        resp = client.post(url, json=forged)
        assert resp.status_code == 400, resp.json
        assert resp.json["error"]["details"] == {"field": "source", "reason": "forged_source"}
    plain = {"event_id": new_id(), "topic": "test.v1", "event_type": "nothing"}
    assert client.post("/events", json=plain).status_code == 202
    seen = bus.wait_event(lambda d: isinstance(d["event"], dict)
                          and d["event"].get("event_id") == plain["event_id"])
    assert seen["event"]["source"] == "api"


@pytest.mark.parametrize(("topic", "event_type"), [
    ("plugins.v1", "invocation_failed"), ("PLUGINS.V1", "invocation_failed"),
    ("plugins.v1", "invocation_failed_x"), ("Plugins.V1", "anything")])
def test_a_plugin_cannot_publish_on_the_reserved_topic(attack_once, bus, conn, settings,
                                                       topic: str, event_type: str) -> None:
    """Reserved in any case and for any event type: the run fails naming the topic, and
    the only event it caused is the worker's own failure event."""
    record, failure = attack_once("bad_output", kind="forged_failure", topic=topic,
                                  event_type=event_type)
    assert record["status"] == "failed"
    assert f"on topic {topic!r}, which is reserved" in record["reason"]
    assert failure["payload"]["plugin"] == "hostile"  # the first caused event is the real one
    entries = conn.xrange(settings.event_stream, min=bus.first_entry[record["event_id"]])
    events = [json.loads(fields[b"event"]) for _, fields in entries if b"event" in fields]
    caused = [e for e in events if isinstance(e, dict)
              and e.get("causation_id") == record["event_id"]]  # the run is over: all of it
    assert [(e["topic"], e["event_type"]) for e in caused] == [
        ("plugins.v1", "invocation_failed")]


def test_results_nested_too_deep_fail_the_run_instead_of_being_dead_lettered(
        attack_once, conn, settings) -> None:
    record, failure = attack_once("bad_output", kind="deep")
    assert record["status"] == "failed" and "nests deeper than 64 levels" in record["reason"]
    assert record["result_event_ids"] == []
    assert failure["event_type"] == "invocation_failed"


def test_dev_shm_is_capped_like_tmp(attack_once) -> None:
    record, result = attack_once("fill_shm")
    assert record["status"] == "succeeded", record
    assert result["payload"]["error"] == "ENOSPC"
    assert result["payload"]["written"] <= 8 * 1024**2  # min(8 MiB, 64Mi / 8)


@pytest.fixture
def attack_once(bus: Bus, conn, settings, stack):
    def run(name: str, **payload: object) -> tuple[dict, dict]:
        event_id = new_id(name.replace("_", "-"))
        bus.publish({"event_id": event_id, "topic": "hostile.v1", "event_type": "attack",
                     "payload": {"attack": name, **payload}})
        caused = bus.result_of(event_id, timeout=60)
        record = next(r for r in records_of(conn, settings, "hostile", 50)
                      if r["event_id"] == event_id)
        return record, caused

    return run
