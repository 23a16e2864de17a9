"""The SPEC §4 defaults, read from inside a real container by the probe plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import Bus, new_id
from workers.identity import RunIds
from workers.warm import HEADROOM_BYTES

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]

DOCUMENTED_ENV = {"EVENT_DATA", "EVENT_FILE", "PLUGIN_NAME", "PLUGIN_VERSION", "INVOCATION_ID"}


@pytest.fixture(scope="module")
def report(conn, settings, host_port) -> dict:
    bus = Bus(conn, settings)
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "probe",
                 "payload": {"port": str(host_port)}})
    result = bus.result_of(event_id)
    assert result["event_type"] == "probe_report", result
    return result["payload"]


def test_runs_as_non_root_without_capabilities(report: dict, settings) -> None:
    ids = RunIds.parse(settings.run_ids)  # a uid of its own, the runs' shared group
    assert ids.first_uid <= report["uid"] <= ids.last_uid and report["gid"] == ids.group
    assert int(report["cap_eff"], 16) == 0
    assert report["no_new_privs"] == "1"


def test_limits_are_in_force_inside_the_container(report: dict, settings) -> None:
    assert report["pids_max"] == str(settings.pids_limit)
    # the plugin's 96Mi, and in a prewarmed container what its launcher holds besides
    memory = 96 * 1024**2 + (HEADROOM_BYTES if "/titan/launcher" in report["pid1"] else 0)
    assert int(report["memory_limit"]) == memory
    # no swap beyond memory; where the kernel keeps no swap accounting, the engine was
    # still told so, and then there is no such file on the host either
    memsw = Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
    assert report["memsw_limit"] == str(memory) or (
        report["memsw_limit"].startswith("error") and not memsw.exists()), report["memsw_limit"]
    assert report["cpu_quota"].split()[0] in ("25000", "25000 100000")
    assert report["nofile"] == settings.nofile_limit
    assert report["fsize"] == settings.fsize_bytes
    assert report["core"] == 0
    assert "docker-init" in report["pid1"] or "/titan/launcher" in report["pid1"]  # warm


def test_filesystem_is_read_only_but_tmp(report: dict, settings) -> None:
    assert not report["write_root"] and not report["write_code"] and not report["write_etc"]
    assert report["write_tmp"]
    (tmp,) = report["tmp_mount"]
    size = min(settings.tmpfs_bytes, 96 * 1024**2 // 2)  # half the probe's 96Mi memory
    for flag in ("noexec", "nosuid", "nodev", f"size={size // 1024}k",
                 f"nr_inodes={settings.tmpfs_inodes}"):
        assert flag in tmp, tmp
    assert report["cwd"] == "/plugin"


def test_no_network_no_docker_socket_no_leaked_environment(report: dict) -> None:
    assert report["interfaces"] == ["lo"]
    assert report["connect_redis"] is False
    assert report["docker_sock"] is False
    leaked = [k for k in report["env"] if k.startswith(("TITAN", "CELERY", "REDIS", "DOCKER"))]
    assert not leaked
    assert set(report["env"]) >= DOCUMENTED_ENV
