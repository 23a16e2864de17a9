"""A handle on one plugin container: stop (the timeout), kill (the output cap), wait for
its end, remove. Every failure to reach the engine is SandboxUnavailable or a False,
never a plugin's failure."""

from __future__ import annotations

import logging
from typing import Any

import requests
from docker.errors import DockerException, NotFound

from manager.core.errors import SandboxUnavailable

log = logging.getLogger(__name__)
STOP_GRACE_S = 2  # SIGTERM, then SIGKILL this much later


class ContainerHandle:
    def __init__(self, container: Any) -> None:
        self.container = container

    @property
    def id(self) -> str:
        return str(self.container.id)

    def stop(self, grace: int = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        try:
            self.container.stop(timeout=grace)
        except (DockerException, requests.RequestException) as exc:
            log.warning("stopping %s failed: %s", self.id[:12], exc)
            self.kill()

    def kill(self) -> None:
        try:
            self.container.kill()
        except (DockerException, requests.RequestException) as exc:
            log.debug("kill %s: %s", self.id[:12], exc)

    def wait(self, timeout: float) -> dict[str, Any]:
        """The container's final state; inspected only when it did not exit cleanly
        (OOMKilled is only in the inspect data), sparing a round trip per good run."""
        try:
            code = self.container.wait(timeout=timeout).get("StatusCode")
            if code == 0:
                return {"ExitCode": 0, "OOMKilled": False}
            self.container.reload()
            return dict(self.container.attrs.get("State", {}))
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"lost the container while waiting: {exc}") from exc

    def remove(self) -> bool:
        """Removes it (killing it); False when the engine did not do it."""
        try:
            self.container.remove(force=True)
        except NotFound:
            pass
        except (DockerException, requests.RequestException) as exc:
            log.warning("could not remove container %s: %s", self.id[:12], exc)
            return False
        return True
