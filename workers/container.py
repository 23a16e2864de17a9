"""A handle on one plugin container that owns its streams: created, attached to (before it
starts, so no output is missed), started, read frame by frame, written to (a prewarmed
launcher's request), stopped (the timeout), killed (the output cap), waited for and
removed; through docker-py's public API only (containers.create, APIClient.attach_socket,
Container.start/stop/kill/wait/reload/remove).

The attach stream is read here, in Docker's documented stream format (Engine API, "attach
to a container": without a TTY each frame is an 8-byte header, the stream's number and
the payload's length, then the payload), from the object attach_socket returns, through
its file interface only (read, write, fileno, close). Every failure to reach the engine
is SandboxUnavailable or a False, never a plugin's failure."""

from __future__ import annotations

import logging
import os
import select
import struct
from collections.abc import Iterator
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, NotFound

from manager.core.errors import SandboxUnavailable
from manager.core.run_end import Exit

log = logging.getLogger(__name__)
STOP_GRACE_S = 2  # SIGTERM, then SIGKILL this much later
HEADER = struct.Struct(">BxxxL")  # stream (0 stdin, 1 stdout, 2 stderr), payload length
STDOUT, STDERR = 1, 2
# What reaching the engine can raise (a stream cut short is an OSError)
ENGINE_ERRORS = (OSError, DockerException, requests.RequestException)


def removed_already(exc: Exception) -> bool:
    """The engine says the container is gone or going: gone (404), or being removed by
    someone else (409: its AutoRemove, another reaper). Either is as good as our removal."""
    if isinstance(exc, NotFound):
        return True
    return (isinstance(exc, APIError) and exc.status_code == 409
            and "in progress" in str(exc.explanation or exc))


def remove_container(container: Any) -> None:
    """Removes it, killing it; a container already gone or going counts as removed."""
    try:
        container.remove(force=True)
    except APIError as exc:
        if not removed_already(exc):
            raise


class ContainerHandle:
    def __init__(self, client: docker.DockerClient, container: Any) -> None:
        self.client = client
        self.container = container
        self.stream: Any = None  # the attach socket's file interface, once attached

    @classmethod
    def create(cls, client: docker.DockerClient, options: dict[str, Any]) -> ContainerHandle:
        return cls(client, client.containers.create(**options))

    @property
    def id(self) -> str:
        return str(self.container.id)

    def attach(self, stdin: bool = False) -> None:
        """Attaches to stdout and stderr (and stdin) before the container starts."""
        self.stream = self.client.api.attach_socket(self.id, params={
            "stdin": int(stdin), "stdout": 1, "stderr": 1, "stream": 1})

    def start(self) -> None:
        self.container.start()

    def address(self, network: str) -> str:
        """Its IPv4 address on `network` (once started: the engine assigns it then)."""
        self.container.reload()
        nets = self.container.attrs.get("NetworkSettings", {}).get("Networks") or {}
        return str((nets.get(network) or {}).get("IPAddress") or "")

    def send(self, data: bytes) -> None:
        """Writes to the container's stdin, all of it (to the stream's descriptor: the
        reader attach_socket returns is the HTTP response's, opened for reading only)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.stream.fileno(), view):]

    def readable(self, timeout_s: float) -> bool:
        """Whether a frame (or the stream's end) is there to read within `timeout_s`."""
        poller = select.poll()
        poller.register(self.stream.fileno(), select.POLLIN | select.POLLHUP)
        return bool(poller.poll(timeout_s * 1000))

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """(stream, payload) frames until the stream ends."""
        while True:
            header = self._read_exactly(HEADER.size)
            if header is None:
                return
            stream, size = HEADER.unpack(header)
            payload = self._read_exactly(size)
            if payload is None:
                return
            yield stream, payload

    def _read_exactly(self, size: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < size:
            chunk = self.stream.read(size - len(buf))
            if not chunk:
                return None  # the stream ended (a frame cut short ends it too)
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        """Releases the attach stream (the container itself is not touched)."""
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError as exc:
                log.debug("closing the stream of %s: %s", self.id[:12], exc)

    def stop(self, grace: int = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        try:
            self.container.stop(timeout=grace)
        except ENGINE_ERRORS as exc:
            log.warning("stopping %s failed: %s", self.id[:12], exc)
            self.kill()

    def kill(self) -> None:
        try:
            self.container.kill()
        except ENGINE_ERRORS as exc:
            log.debug("kill %s: %s", self.id[:12], exc)

    def wait(self, timeout: float) -> Exit:
        """How the container exited; inspected only when it did not exit cleanly
        (OOMKilled is only in the inspect data), sparing a round trip per good run."""
        try:
            code = self.container.wait(timeout=timeout).get("StatusCode")
            if code == 0:
                return Exit(0)
            self.container.reload()
            state = self.container.attrs.get("State", {})
            return Exit(state.get("ExitCode"), bool(state.get("OOMKilled")))
        except ENGINE_ERRORS as exc:
            raise SandboxUnavailable(f"lost the container while waiting: {exc}") from exc

    def remove(self) -> bool:
        """Removes it (killing it); False when the engine did not do it."""
        self.close()
        try:
            remove_container(self.container)
        except ENGINE_ERRORS as exc:
            log.warning("could not remove container %s: %s", self.id[:12], exc)
            return False
        return True
