"""No host identity is shared with a run, on every lane: the host's `nobody` and another
run's uid can neither read a running plugin's /proc files nor signal it; two runs at once
have different uids; a signalled or dead prewarmed launcher costs a run its warm start,
never the run; and payload files are the kernel's to grant (ACLs included) and are
refused by their size before a byte is copied."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lanes import Lane, report

from harness import (
    SYSTEM_PYTHON,
    WorkerProcess,
    new_id,
    processes,
    running_a_plugin,
    wait_until,
)
from workers.identity import RunIds
from workers.options import LABEL_POOL

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]
NOBODY = 65534
# What one host uid can do to a process: read its environment and its root, signal it
# (signal 0: the permission check alone, nothing is delivered).
PROBE = """
import json, os, sys
pid, out = int(sys.argv[1]), {}
for name, act in (("environ", lambda: open(f"/proc/{pid}/environ", "rb").read(64)),
                  ("root", lambda: os.listdir(f"/proc/{pid}/root/tmp")),
                  ("signal", lambda: os.kill(pid, 0))):
    try:
        act()
        out[name] = "allowed"
    except OSError as exc:
        out[name] = exc.strerror
print(json.dumps(out))
"""


def probe_as(uid: int, gid: int, pid: int) -> dict[str, str]:
    done = subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", PROBE, str(pid)], user=uid,
                          group=gid, extra_groups=[], cwd="/", capture_output=True,
                          text=True, timeout=30, check=True)
    return json.loads(done.stdout)


def lane_containers(docker_client: Any, lane: Lane) -> list[Any]:
    """The running containers of this lane's worker."""
    found = docker_client.containers.list(filters={"label": [
        f"titan.instance={lane.settings.instance}", "titan.plugin=hostile"]})
    runtime = lane.settings.gvisor_runtime if lane.gvisor else None
    return [c for c in found if (c.attrs["HostConfig"].get("Runtime") == runtime) == lane.gvisor
            and (lane.gvisor or c.attrs["HostConfig"].get("Runtime") in (None, "runc"))]


def host_processes(container: Any, lane: Lane) -> list[tuple[int, int]]:
    """(host pid, host uid) of what runs a plugin: under runc every process of the
    container; under gVisor its Sentry (the only host process the plugin lives in)."""
    if lane.gvisor:
        container.reload()
        pid = int(container.attrs["State"]["Pid"])
        return [(pid, os.stat(f"/proc/{pid}").st_uid)]
    return [(int(pid), int(uid)) for pid, uid in processes(container, "pid,uid")]


def busy(docker_client: Any, lane: Lane) -> list[Any]:
    """The containers running a `linger` run (an idle prewarmed one has no main.py)."""
    out = []
    for container in lane_containers(docker_client, lane):
        if lane.gvisor:
            if container.labels.get(LABEL_POOL) != "1" or container.labels.get(
                    "titan.invocation"):
                out.append(container)  # runsc hides its processes from `docker top`
            continue
        if running_a_plugin(container):
            out.append(container)
    return out


def test_no_host_identity_reaches_into_a_run(lane: Lane, docker_client) -> None:
    ids = RunIds.parse(lane.settings.run_ids)
    events = [new_id("linger") for _ in range(2)]
    # Both runs must be seen in flight at once. Under runc that is by their processes, and
    # the second run may start cold seconds after the first (a loaded CI machine): they
    # linger 7 s (the plugin's timeout is 10). Under gVisor their containers are counted.
    seconds = 3 if lane.gvisor else 7
    for event_id in events:
        lane.bus.publish({"event_id": event_id, "topic": "hostile.v1", "event_type": "attack",
                          "payload": {"attack": "linger", "seconds": seconds}})
    if lane.gvisor and lane.warm:  # both prewarmed sandboxes serve now: probe every one
        running = wait_until(lambda: (c := lane_containers(docker_client, lane))
                             and len(c) >= 2 and c, 60, "two gVisor sandboxes")
    else:
        running = wait_until(lambda: (c := busy(docker_client, lane)) and len(c) == 2
                             and c, 60, "two runs in flight")
    uids = [int(c.labels["titan.uid"].split(":")[0]) for c in running]
    assert len(set(uids)) == len(uids) and all(ids.first_uid <= u <= ids.last_uid
                                              for u in uids), uids
    for container, other in ((running[0], uids[1]), (running[1], uids[0])):
        for pid, host_uid in host_processes(container, lane):
            for who in (NOBODY, other):
                seen = probe_as(who, ids.group if who == other else NOBODY, pid)
                assert seen["environ"] != "allowed" and seen["root"] != "allowed", (who, seen)
                if lane.gvisor and who == NOBODY and host_uid == NOBODY:
                    continue  # runsc runs every Sentry as host uid 65534 (docs/security.md)
                assert seen["signal"] != "allowed", (who, host_uid, seen)
    reported = [report_of(lane, e) for e in events]
    assert len({r["uid"] for r in reported}) == 2, reported
    assert all(r["gid"] == ids.group for r in reported), reported


def report_of(lane: Lane, event_id: str) -> dict:
    result = lane.bus.result_of(event_id, timeout=60)
    assert result["event_type"] != "invocation_failed", result
    return result["payload"]


@pytest.mark.parametrize("signal", ["SIGINT", "SIGTERM"])
def test_a_signalled_idle_launcher_costs_a_warm_start_never_a_run(
        attack, lane: Lane, docker_client, signal: str) -> None:
    if not lane.warm:
        return  # a cold lane has no prewarmed launcher to signal
    for _ in range(10):  # until the pool has a container ready for the plugin
        assert report(attack("marker"))
        idle = [c for c in lane_containers(docker_client, lane)
                if c.labels.get(LABEL_POOL) == "1" and c not in busy(docker_client, lane)]
        if idle:
            break
    else:
        raise AssertionError("no prewarmed container became ready")
    for container in idle:
        container.kill(signal=signal)  # the engine delivers it to PID 1, the launcher
    outcomes = [attack("marker") for _ in range(3)]
    assert [r["status"] for r, _ in outcomes] == ["succeeded"] * 3, outcomes
    if signal == "SIGINT":  # ignored: the signalled launchers serve their runs
        assert any(r["warm"] for r, _ in outcomes), outcomes


@pytest.fixture
def acl_file(files_dir: Path, settings) -> Any:
    """A 0644 file in a 0755 directory that an ACL entry denies the runs' group."""
    directory = files_dir / new_id("acl")
    directory.mkdir(mode=0o755)
    note = directory / "note.md"
    note.write_text("# ACL-PROTECTED\n")
    note.chmod(0o644)
    group = RunIds.parse(settings.run_ids).group

    def deny(target: Path) -> Path:
        subprocess.run(["setfacl", "-m", f"g:{group}:---", str(target)], check=True)
        return note

    yield directory, deny
    subprocess.run(["rm", "-rf", str(directory)], check=True)


@pytest.mark.parametrize("denied", ["file", "directory"])
def test_an_acl_denying_the_runs_group_is_obeyed(attack, acl_file, denied: str) -> None:
    directory, deny = acl_file
    note = directory / "note.md"
    allowed, _ = attack("read_paths", paths=[str(note)], path=str(note))
    assert allowed["status"] == "succeeded", allowed  # readable until the ACL says no
    deny(note if denied == "file" else directory)
    record, failure = attack("read_paths", paths=[str(note)], path=str(note))
    assert record["status"] == "rejected", record
    assert "permission denied" in record["reason"] and str(note) in record["reason"]
    assert "ACL-PROTECTED" not in json.dumps(record) + json.dumps(failure)


def test_a_sparse_payload_over_the_limit_is_rejected_with_nothing_written(
        attack, files_dir: Path, lane: Lane) -> None:
    sparse = files_dir / new_id("sparse")
    with sparse.open("wb") as fh:
        fh.truncate(1000 * 2**20)  # 1000 MiB that occupy no block
    free = os.statvfs(lane.settings.cache_dir)
    try:
        record, _ = attack("read_paths", paths=[str(sparse)], path=str(sparse))
    finally:
        sparse.unlink()
    after = os.statvfs(lane.settings.cache_dir)
    assert record["status"] == "rejected", record
    assert f"over the limit of {lane.settings.max_payload_bytes}" in record["reason"]
    written = (free.f_bavail - after.f_bavail) * free.f_frsize
    assert written < 64 * 2**20, f"{written} bytes written for a rejected payload"


def test_a_worker_refuses_a_range_of_ids_the_host_already_uses(settings) -> None:
    """65534 is the host's nobody: a range holding it would share an identity."""
    worker = WorkerProcess(settings.with_(task_queue=f"{settings.task_queue}.overlap"),
                           "overlap", concurrency=1, TITAN_RUN_IDS="60000-70000")
    try:
        wait_until(lambda: worker.proc.poll() is not None, 60, "the worker to refuse")
    finally:
        worker.stop()
    assert worker.proc.returncode == 1
    log = worker.log.read_text()
    assert "TITAN_RUN_IDS 60000-70000 overlaps ids the host already uses" in log
    assert "nobody has id 65534" in log
