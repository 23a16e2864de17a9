"""The kernel's OOM verdict (workers.oom) on real containers under runc and gVisor: an
OOM-killed container is one, a container SIGKILLed without memory pressure and one that
exits are not. Judged by the watch alone (the engine's flag is not asked), so this fails
whenever the watch does, whatever the engine's own race does on a given run."""

from __future__ import annotations

import os
from typing import Any

import docker
import pytest

from manager.core.config import Settings
from workers.container import remove_container
from workers.oom import OomWatcher

pytestmark = pytest.mark.integration
# Each waits for a line on stdin first: the test sends it once the watch is set up, so a
# container that exits at once is not gone with its cgroup before it is watched (CI)
GATE = "import sys\nsys.stdin.readline()\n"
PROGRAMS = {
    "balloon": GATE + "b = []\nwhile True:\n    b.append(bytearray(8 << 20))",
    "killed": GATE + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "exits": GATE + "print('done')",
}


def run(client: docker.DockerClient, watcher: OomWatcher, settings: Settings, runtime: str,
        program: str) -> tuple[int, bool]:
    """(exit code, the watch's verdict) of one container like a run's (64 MiB)."""
    container: Any = client.containers.create(
        settings.runtime_image, ["python3", "-c", PROGRAMS[program]], runtime=runtime,
        network_mode="none", mem_limit=64 << 20, memswap_limit=64 << 20, init=True,
        user="2000999:2000000", labels={"titan.instance": settings.instance},
        stdin_open=True)
    try:
        stream = client.api.attach(container.id, stdout=True, stderr=True, stream=True,
                                   logs=False)
        gate = client.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})
        container.start()
        watch = watcher.watch(container.id)
        assert watch is not None, "the container's memory cgroup is not to be found"
        os.write(gate.fileno(), b"go\n")  # the stream's descriptor (workers.container)
        gate.close()
        for _ in stream:
            pass
        code = container.wait(timeout=120)["StatusCode"]
        return code, watcher.killed(watch)
    finally:
        remove_container(container)


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_the_kernel_says_which_container_ran_out_of_memory(docker_client, settings,
                                                           runtime: str) -> None:
    watcher = OomWatcher()
    for _ in range(3):
        assert run(docker_client, watcher, settings, runtime, "balloon") == (137, True)
        assert run(docker_client, watcher, settings, runtime, "killed") == (137, False)
        assert run(docker_client, watcher, settings, runtime, "exits") == (0, False)
    assert watcher.watches == {}  # every watch ended with its verdict
