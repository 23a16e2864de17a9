"""SPEC §4 against hostile code: each attack goes through the real path (event on the bus
-> listener -> Celery worker -> Docker) and must end with the right status and a reason a
person understands, the worker alive, no container left and the host untouched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lanes import report

from harness import Bus, bridge_gateway, new_id, records_of
from manager.core.events import Event
from workers.identity import RunIds

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


# Resources

def test_fork_bomb_hits_the_pids_limit(attack, settings, lane) -> None:
    record, caused = attack("fork_bomb")
    if lane.gvisor and record["status"] == "oom":
        return  # gVisor's kernel spends memory per process: the memory limit ends it first
    got = report((record, caused))
    assert got["error"] == "EAGAIN" and got["children"] < settings.pids_limit


def test_cpu_spin_times_out(attack) -> None:
    record, failure = attack("cpu_spin")
    assert record["status"] == "timeout" and record["reason"] == "timed out after 10s"
    assert failure["payload"]["status"] == "timeout"
    assert record["duration_s"] < 10 + 5


@pytest.mark.parametrize(("name", "stream"), [("giant_line", "stdout"),
                                              ("binary_flood", "stdout"),
                                              ("stderr_flood", "stderr")])
def test_output_floods_stop_at_the_cap(attack, settings, name: str, stream: str) -> None:
    record, _ = attack(name)
    assert record["status"] == "output_limit", record
    assert record["reason"] == f"{stream} exceeded {settings.output_cap_bytes} bytes"
    assert record[f"{stream}_truncated"] is True
    assert len(record[stream].encode("utf-8", "surrogateescape")) >= settings.output_cap_bytes


def test_binary_stdout_fails_with_reason(attack) -> None:
    record, _ = attack("binary_small")
    assert record["status"] == "failed"
    assert record["reason"].startswith("invalid output: stdout is not UTF-8 text")


def test_filling_tmp_stops_at_its_size_and_nothing_persists(attack, settings, lane) -> None:
    if lane.gvisor:
        # gVisor's tmpfs lives in its kernel's memory and ignores nr_inodes: the memory limit
        # ends it. Files of 64 KiB reach that limit in hundreds of syscalls, not thousands
        # (each one costs a ptrace round trip), so the 5 s time limit is never what stops it.
        for name, payload in (("fill_tmp", {}), ("many_files", {"file_bytes": 65536})):
            record, caused = attack(name, timeout=120, **payload)
            assert record["status"] in ("oom", "succeeded"), record
            if record["status"] == "succeeded":
                assert caused["payload"]["error"] in ("ENOSPC", "EFBIG", "ENOMEM"), caused
    else:
        got = report(attack("fill_tmp"))
        assert got["error"] in ("ENOSPC", "EFBIG")
        assert got["written"] <= settings.tmpfs_bytes
        files = report(attack("many_files", timeout=120))
        assert files["error"] == "ENOSPC"
    assert report(attack("tmp_listing"))["tmp"] == []


def test_open_files_hit_nofile(attack, settings) -> None:
    got = report(attack("open_files"))
    assert got["error"] == "EMFILE" and got["opened"] < settings.nofile_limit


def test_one_huge_file_hits_fsize(attack, settings) -> None:
    got = report(attack("huge_file"))
    assert got["error"] == "EFBIG" and got["written"] == settings.fsize_bytes


BALLOONS = 10
RUNS_IN_A_ROW = 12


def test_memory_balloons_are_oom_killed_under_load(lane, conn) -> None:
    """The kernel's OOM kill is what every balloon's record says, on every lane, while
    other runs spin (the engine's own flag lags behind a container's exit most under
    load: under gVisor it was wrong for 3 of 20 OOM kills)."""
    spins = [new_id("spin") for _ in range(2)]
    for spin in spins:
        lane.bus.publish({"event_id": spin, "topic": "hostile.v1", "event_type": "attack",
                          "payload": {"attack": "cpu_spin"}})
    balloons = [new_id("balloon") for _ in range(BALLOONS)]
    for event_id in balloons:
        lane.bus.publish({"event_id": event_id, "topic": "hostile.v1",
                          "event_type": "attack", "payload": {"attack": "balloon"}})
    for event_id in balloons:
        failure = lane.bus.result_of(event_id, timeout=180)
        assert failure["payload"]["status"] == "oom", failure["payload"]
        assert failure["payload"]["reason"].startswith("killed: out of memory"), failure
    for spin in spins:
        assert lane.bus.result_of(spin, timeout=60)["payload"]["status"] == "timeout"
    records = [r for r in records_of(conn, lane.settings, "hostile", 200)
               if r["event_id"] in balloons]
    assert sorted(r["status"] for r in records) == ["oom"] * BALLOONS


def test_a_sigkill_without_memory_pressure_is_no_oom(attack) -> None:
    record, failure = attack("kill_self")
    assert record["status"] == "failed", record
    assert record["reason"] == "exited with code 137 (killed by signal 9)", record
    assert failure["payload"]["status"] == "failed"


def test_no_container_is_ever_reused(attack, lane) -> None:
    """Each run leaves a mark in /tmp and looks for an earlier one; on a warm lane most of
    them ran in a container prewarmed while the one before ran (a pool of one)."""
    seen, warm = [], 0
    for _ in range(RUNS_IN_A_ROW):
        record, result = attack("marker")
        seen.append(result["payload"]["seen"])
        warm += bool(record["warm"])
    assert not any(seen), "a run saw an earlier run's /tmp"
    if lane.warm:
        assert warm >= RUNS_IN_A_ROW // 2, f"only {warm} of {RUNS_IN_A_ROW} runs were prewarmed"


# Network

def test_no_egress_at_all(attack, host_port: int, docker_client) -> None:
    gateway = bridge_gateway(docker_client)
    got = report(attack("network", hostname="pypi.org", ip=gateway, port=host_port,
                        redis_port=host_port, gateway=gateway))
    assert all(v != "connected" for v in got.values()), got
    assert got["hostname"] in ("gaierror", "EAI_AGAIN", "ENETUNREACH") or "gai" in got["hostname"]


# Host

def test_host_is_out_of_reach(attack, lane) -> None:
    got = report(attack("host"))
    # under gVisor the plugin talks to a user-space kernel, not to the host's
    host_kernel = Path("/proc/version").read_text().strip()
    assert (got["kernel"] != host_kernel) is lane.gvisor, got["kernel"]
    for key in ("write_root", "write_code", "write_etc"):
        assert got[key] in ("EROFS", "EACCES"), (key, got[key])
    assert got["date_set"] == "exit 1" and got["mount"] != "ok"
    assert got["raw_socket"] == "EPERM", got
    # gVisor too: runsc applies the container's seccomp profile (registered with
    # --oci-seccomp), so its kernel refuses new namespaces as the host's does under runc
    assert got["unshare_user"] == "EPERM" and got["unshare_mount"] == "EPERM", got
    if lane.gvisor:  # gVisor's kernel makes the node, but it leads to no host device
        assert got["mknod"] in ("EPERM", "ok") and got["device_read"] != "ok", got
    else:
        assert got["mknod"] == "EPERM", got
    assert got["setuid_files"], "the image should hold setuid binaries for this test to mean much"
    assert got["su_stdout"] != "0" and got["su_code"] != 0
    ids = RunIds.parse(lane.settings.run_ids)
    assert ids.first_uid <= got["uid"] == got["euid"] <= ids.last_uid
    assert set(got["environ"]) <= {"EVENT_DATA", "EVENT_FILE", "PLUGIN_NAME", "PLUGIN_VERSION",
                                   "INVOCATION_ID", "HOME", "PATH", "LANG", "HOSTNAME",
                                   "USER", "LOGNAME",
                                   "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert got["plugin_files"] == ["main.py", "plugin.yaml"]
    assert got["docker_sock"] is False
    assert not Path("/pwned").exists()


def test_pid_1_is_out_of_the_plugins_reach(attack, lane) -> None:
    """In a prewarmed container PID 1 is the product's launcher: non-dumpable, so the
    plugin (same uid) reads neither its environment nor the stream its request came
    through. A cold container's PID 1 is docker-init, which never held a request."""
    paths = ["/proc/1/cmdline", "/proc/1/environ", "/proc/1/fd/0", "/proc/1/mem"]
    for _ in range(5):  # a warm lane's first run may find its pool still filling
        record, caused = attack("read_paths", paths=paths)
        if record["warm"] or not lane.warm:
            break
    got = report((record, caused))["results"]
    if record["warm"] and lane.gvisor:
        # gVisor's /proc does not hide a non-dumpable process from its own uid: the
        # launcher's environment is the container's (no secret), its request was read
        # before the plugin started (nothing left to read), its memory (the run's token)
        # stays unreadable
        assert "/titan/launcher" in got["/proc/1/cmdline"], got
        assert got["/proc/1/fd/0"] in ("EACCES", "opened:EAGAIN"), got
        assert "token" not in got["/proc/1/environ"].lower(), got
    elif record["warm"]:
        assert "/titan/launcher" in got["/proc/1/cmdline"], got
        assert got["/proc/1/environ"] == "EACCES" and got["/proc/1/fd/0"] == "EACCES", got
    else:
        assert not lane.warm, "no warm run in 5"
        assert "docker-init" in got["/proc/1/cmdline"], got
    assert not got["/proc/1/mem"].startswith("read:"), got


# Paths

@pytest.fixture
def planted(files_dir: Path) -> dict[str, Path]:
    """A secret outside the allowed directory, and ways to reach it planted inside."""
    secret_dir = Path(os.path.dirname(files_dir)) / f"titan-secret-{new_id()}"
    secret_dir.mkdir()
    secret = secret_dir / "secret.txt"
    secret.write_text("TOP-SECRET")
    inside = files_dir / new_id("plant")
    inside.mkdir()
    (inside / "ok.txt").write_text("fine")
    (inside / "abs").symlink_to(secret)
    (inside / "rel").symlink_to(os.path.relpath(secret, inside))
    (inside / "chain").symlink_to(inside / "abs")
    (inside / "loop").symlink_to(inside / "loop")
    yield {"secret": secret, "inside": inside}
    for p in inside.iterdir():
        p.unlink()
    inside.rmdir()
    secret.unlink()
    secret_dir.rmdir()


def test_plugin_cannot_read_outside_its_globs(attack, planted) -> None:
    inside, secret = planted["inside"], planted["secret"]
    paths = [str(inside / n) for n in ("ok.txt", "abs", "rel", "chain", "loop")]
    paths += [f"{inside}/../../{secret.parent.name}/secret.txt", str(secret), "/etc/shadow"]
    got = report(attack("read_paths", paths=paths))["results"]
    assert got[paths[0]] == "read:fine"
    assert not any("TOP-SECRET" in v for v in got.values()), got


@pytest.mark.parametrize("how", ["dotdot", "abs", "rel", "chain", "loop", "hardlink"])
def test_payload_path_escapes_are_rejected_before_any_container(attack, planted,
                                                                how: str) -> None:
    inside, secret = planted["inside"], planted["secret"]
    if how == "hardlink":
        os.link(secret, inside / "hard")
        path = str(inside / "hard")
    elif how == "dotdot":
        path = f"{inside}/../../{secret.parent.name}/secret.txt"
    else:
        path = str(inside / how)
    record, failure = attack("read_paths", paths=[path], path=path)
    assert record["status"] == "rejected", record
    assert record.get("exit_code") is None and record.get("container_start_s") is None
    assert failure["payload"]["status"] == "rejected"
    assert path in failure["payload"]["reason"]


@pytest.mark.parametrize("how", ["root-only file", "root-only directory"])
def test_a_payload_its_user_could_not_read_is_rejected(attack, planted, how: str) -> None:
    """The worker copies a payload as root: it copies only what the kernel let a run's
    identity open."""
    inside = planted["inside"]
    private = inside / "private"
    private.mkdir(mode=0o755)
    secret = private / "root-only.txt"
    secret.write_text("ROOT-ONLY")
    (secret if how == "root-only file" else private).chmod(0o600 if "file" in how else 0o700)
    try:
        record, failure = attack("read_paths", paths=[str(secret)], path=str(secret))
    finally:
        private.chmod(0o755)
        secret.unlink()
        private.rmdir()
    assert record["status"] == "rejected", record
    assert "ROOT-ONLY" not in json.dumps(record) + json.dumps(failure)
    assert "permission denied" in record["reason"] and str(secret) in record["reason"], \
        record["reason"]


def test_payload_path_mounts_only_that_file(attack, planted) -> None:
    inside = planted["inside"]
    ok = str(inside / "ok.txt")
    other = inside / "other.txt"
    other.write_text("not named by the event")
    try:
        got = report(attack("read_paths", paths=[ok, str(other)], path=ok))["results"]
    finally:
        other.unlink()
    assert got == {ok: "read:fine", str(other): "ENOENT"}


def test_a_warm_run_gets_its_payload_file_as_a_cold_one_does(attack, lane, planted) -> None:
    """A payload file no longer makes a run cold: its checked copy is put where the
    prewarmed container has a private directory mounted. Either way the run reads the
    one file the event named, its own (0400, its uid), alone in its directory, and can
    change nothing."""
    ok = planted["inside"] / "ok.txt"
    views, warm = [], 0
    for _ in range(10):  # until two were prewarmed (the first run of this configuration
        record, caused = attack("payload_view", path=str(ok))  # starts its pool)
        views.append(report((record, caused)))
        warm += bool(record["warm"])
        if warm == 2 or not lane.warm:
            break
    assert warm == 2 or not lane.warm, f"{warm} of {len(views)} runs were prewarmed"
    for got in views:
        assert got["text"] == "fine" and got["mode"] == "0o400" and got["mine"], got
        assert got["beside"] == ["ok.txt"], got
        for change in ("write", "create", "chmod", "unlink"):
            assert got[change] in ("EROFS", "EACCES", "EPERM"), (change, got)
    assert ok.read_text() == "fine" and oct(ok.stat().st_mode & 0o777) == "0o644"


# Events

def test_oversized_deep_and_malformed_events_are_dead_lettered(bus: Bus) -> None:
    base = {"event_id": new_id(), "topic": "hostile.v1", "event_type": "attack"}
    cases = [
        (json.dumps({**base, "payload": {"x": "a" * 2 * 1024 * 1024}}), "too_large"),
        (json.dumps(base)[:-1] + ', "payload": {"x": ' + "[" * 1000 + "]" * 1000 + "}}",
         "too_deep"),
        (b'{"event_id": "\xc3\x28", "topic": "a", "event_type": "b"}', "invalid_utf8"),
        ('"just a string"', "not_an_object"),
    ]
    for raw, reason in cases:
        dead = bus.dead_letter(bus.publish(raw))
        assert dead["reason"] == reason and dead["detail"]


def test_event_just_under_the_limit_reaches_the_plugin_whole(attack, settings) -> None:
    base = Event(new_id("size"), "hostile.v1", "attack",
                 {"attack": "event_size", "fill": ""}).encode()
    fill = "z" * (settings.max_event_bytes - len(base.encode()) - 64)
    record, caused = attack("event_size", fill=fill)
    got = caused["payload"]
    assert record["status"] == "succeeded", record
    assert settings.max_event_bytes - 200 < got["size"] <= settings.max_event_bytes
    assert got["env_has_event_data"] is False  # too big for one environment variable


# Output

@pytest.mark.parametrize(("kind", "reason"), [
    ("not_json", "is not JSON"), ("truncated", "is not JSON"),
    ("nan", "NaN is not valid JSON"), ("surrogate", "lone surrogate"),
    ("missing_keys", "lacks topic, event_type"), ("many_lines", "more than the limit of 100"),
])
def test_bad_output_fails_with_reason(attack, kind: str, reason: str) -> None:
    record, failure = attack("bad_output", kind=kind)
    assert record["status"] == "failed" and reason in record["reason"], record
    assert failure["payload"]["reason"] == record["reason"]


