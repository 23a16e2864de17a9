"""The container a worker runs in, when it runs in one on the engine it drives (compose).

A worker's pid means nothing outside its own PID namespace, so the plugin containers of a
worker container that died (`docker kill`, an OOM, a host crash) are found by its
container instead: each is labelled with it, and any worker on that engine removes them
once the engine says that container is no longer running. Docker bind-mounts a
container's hostname file from `<data root>/containers/<id>/hostname`, which names the id;
the engine confirms it, so a worker that drives another engine labels nothing."""

from __future__ import annotations

import re
from pathlib import Path

HOSTNAME_MOUNT = re.compile(r"/containers/([0-9a-f]{64})/hostname\s")
GONE = frozenset({"exited", "dead", "removing"})  # restarting comes back and reaps its own


def own_container(mountinfo: Path = Path("/proc/self/mountinfo")) -> str:
    """This process's container id, as its mounts name it ("" outside a container)."""
    try:
        found = HOSTNAME_MOUNT.search(mountinfo.read_text())
    except OSError:
        return ""
    return found.group(1) if found else ""
