"""The Docker engine, as one worker process uses it: one client, the labels that mark its
work, creating containers (an absent image pulled once when a registry answers), what
the engine can run (images, runtimes), the kernel's OOM verdicts (workers.oom), the run
identities (workers.identity), whether a container was stopped from outside, and reaping
what no run uses."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from functools import cached_property
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound

from manager.core.errors import SandboxUnavailable
from manager.core.run_groups import EngineSettings
from workers.container import ContainerHandle
from workers.home import GONE, own_container
from workers.identity import Identities
from workers.oom import OomWatch, OomWatcher
from workers.options import (
    LABEL,
    LABEL_CONTAINER,
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_INVOCATION,
    LABEL_PID,
    LABEL_PLUGIN,
    LABEL_POOL,
    LABEL_START,
    LABEL_UID,
    pid_alive,
    started,
)
from workers.run_spec import RunSpec

log = logging.getLogger(__name__)
KILL_EVENT_WAIT_S = 1.0
DOCKER_TIMEOUT_S = 30
PULL_RETRY_S = 60


def connect_docker() -> docker.DockerClient:
    """The one factory for Docker clients: one per worker process (DOCKER_HOST and
    friends honoured), with a timeout on every call."""
    try:
        client = docker.from_env(timeout=DOCKER_TIMEOUT_S)
        client.ping()
        return client
    except (DockerException, requests.RequestException) as exc:
        raise SandboxUnavailable(f"Docker engine unreachable: {exc}") from exc


class Engine:
    """Per worker process (and `titan-plugins run`)."""

    def __init__(self, settings: EngineSettings,
                 client: docker.DockerClient | None = None) -> None:
        self._client = client
        self._pulls: dict[str, float] = {}
        self.oom = OomWatcher()
        self.identities = Identities(settings.identity)
        self.settings = settings
        # prewarmed containers per plugin (ready or serving a run), as the last reap saw
        # them: the heartbeat reports it (the console's Workers page)
        self.pooled: dict[str, int] = {}

    @cached_property
    def base_labels(self) -> dict[str, str]:
        """What marks this process's containers; its own container's id when it runs in
        one on this engine (workers.home)."""
        labels = {LABEL: "1", LABEL_INSTANCE: self.settings.instance,
                  LABEL_HOST: self.settings.worker_name}
        if self.home:
            labels[LABEL_CONTAINER] = self.home
        return labels

    @cached_property
    def home(self) -> str:
        """This worker's container on this engine, or ""."""
        own = own_container()
        if not own:
            return ""
        try:
            self.client.containers.get(own)
        except (DockerException, requests.RequestException):
            return ""  # not on this engine (or not a container at all)
        return own

    @property
    def client(self) -> docker.DockerClient:
        """Connected on first use, then reused for every run of this process."""
        if self._client is None:
            self._client = connect_docker()
        return self._client

    @cached_property
    def docker_root(self) -> str:
        """The engine's data directory: never mounted into a plugin, whatever is allowed."""
        try:
            return str(self.client.info().get("DockerRootDir") or "/var/lib/docker")
        except (DockerException, requests.RequestException):
            return "/var/lib/docker"

    def create(self, opts: dict[str, Any], image: str) -> ContainerHandle:
        """Creates a container; an absent image is pulled once when a registry answers."""
        try:
            return ContainerHandle.create(self.client, opts)
        except ImageNotFound:
            if not self._pull(image):
                raise
            return ContainerHandle.create(self.client, opts)

    def refused(self, spec: RunSpec, exc: APIError) -> str:
        """Why the engine refused a container, with the fix when it lacks the runtime."""
        why = str(exc.explanation or exc)
        runtime = spec.config.runtime
        if runtime and "runtime" in why.lower():
            return (f"isolation: gvisor needs the Docker runtime {runtime!r}, which this "
                    f"worker's engine ({self.settings.worker_name}) lacks: register it with "
                    "the engine (make up does it for the engine it starts; see "
                    f"docs/architecture.md, gVisor). The engine said: {why}")
        return f"the Docker engine refused the container: {why}"

    def _pull(self, image: str) -> bool:
        """One pull attempt per image and minute (a registry may answer elsewhere)."""
        last = self._pulls.get(image, 0.0)
        if time.monotonic() - last < PULL_RETRY_S:
            return False
        self._pulls[image] = time.monotonic()
        try:
            self.client.images.pull(image)
            return True
        except (DockerException, requests.RequestException) as exc:
            log.warning("image %s is absent and could not be pulled: %s", image, exc)
            return False

    def image_missing(self, image: str) -> str:
        return (f"image {image!r} is not present on this worker's Docker engine and could "
                f"not be pulled: use image: {self.settings.runtime_image} (built by make up) "
                f"or build or load {image!r} on every worker host")

    def runtimes(self) -> dict[str, str]:
        """The container runtimes registered with this engine (runc, and runsc for gVisor
        when it is registered), each with its program's path."""
        found = self.client.info().get("Runtimes") or {}
        return {name: str((spec or {}).get("path") or name) for name, spec in found.items()}

    def images(self) -> list[str]:
        """The image names (repo:tag) present on this engine."""
        return sorted({t for img in self.client.images.list() for t in img.tags})

    def oom_killed(self, watch: OomWatch | None) -> bool:
        """Whether the kernel's OOM killer acted in the container (workers.oom)."""
        return self.oom.killed(watch)

    def stopped_from_outside(self, container: ContainerHandle, started_wall: float) -> bool:
        """Whether the engine itself killed or stopped the container (an engine shutdown, a
        docker stop), as its event log tells: asked only for a signal death this worker
        did not cause (its timeout, its output cap) and the kernel did not (OOM)."""
        try:  # the engine logs its kill just after it signals: look a moment ahead
            events = self.client.events(since=int(started_wall) - 1,
                                        until=time.time() + KILL_EVENT_WAIT_S,
                                        filters={"container": container.id,
                                                 "event": ["kill", "stop", "die"]},
                                        decode=True)
            return any(e.get("Action") in ("kill", "stop") for e in events)
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"the engine went away with the container: {exc}") from exc

    def ping(self) -> None:
        """Raises SandboxUnavailable when the engine does not answer (and reconnects next
        time)."""
        try:
            self.client.ping()
        except SandboxUnavailable:
            self._client = None
            raise
        except (DockerException, requests.RequestException) as exc:
            self._client = None
            raise SandboxUnavailable(f"Docker engine unreachable: {exc}") from exc

    def mine(self, extra: dict[str, str]) -> list[Any]:
        """This host's and instance's containers that also carry `extra` labels."""
        labels = {LABEL: "1", LABEL_INSTANCE: self.settings.instance,
                  LABEL_HOST: self.settings.worker_name, **extra}
        # sparse: the list's own data (labels included), no inspect per container that
        # could fail for one removed meanwhile
        return self.client.containers.list(
            all=True, sparse=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})

    def reap(self, children: set[int] | None = None,
             held: Callable[[list[str]], set[str]] | None = None) -> list[str]:
        """Removes this host's containers that no run is using: those whose worker process
        is gone, and those of `children` (this worker's processes) whose run nobody holds
        (`held`: which of these runs a live process holds; a container left over by a
        start or remove that failed while the engine was away). The holds are read after
        the containers are listed, so a run claimed meanwhile is never mistaken for waste."""
        try:
            containers = self.mine({})
        except (DockerException, requests.RequestException) as exc:
            log.warning("cannot list containers to reap: %s", exc)
            return []
        labelled = [(c, c.attrs.get("Labels") or {}) for c in containers]
        self.pooled = dict(Counter(labels.get(LABEL_PLUGIN, "") for _, labels in labelled
                                   if labels.get(LABEL_POOL) == "1"))
        candidates = [labels.get(LABEL_INVOCATION, "") for _, labels in labelled
                      if children is not None and int(labels.get(LABEL_PID, "0") or 0)
                      in children and labels.get(LABEL_INVOCATION)]
        in_use = held(candidates) if held and candidates else set()
        reaped = []
        for c, labels in labelled:
            pid = int(labels.get(LABEL_PID, "0") or 0)
            alive = pid_alive(pid) and labels.get(LABEL_START) in (None, started(pid))
            invocation = labels.get(LABEL_INVOCATION, "")
            mine = children is not None and pid in children
            pooled = labels.get(LABEL_POOL) == "1"  # its process removes it after use
            if alive and (pooled or not (mine and invocation not in in_use)):
                continue
            reaped.append(self.discard(c, labels))
        return reaped

    def discard(self, container: Any, labels: dict[str, str]) -> str:
        """Removes a container no run uses and gives its run uid back; names it."""
        if ContainerHandle(self.client, container).remove():
            self.identities.give_back_label(labels.get(LABEL_UID))
        return labels.get(LABEL_INVOCATION) or container.id[:12]

    def reap_strays(self) -> list[str]:
        """Removes the containers of this instance's worker containers on this engine that
        are no longer running (workers.home); only a worker in a container here looks."""
        if not self.home:
            return []
        try:
            strays = self.client.containers.list(all=True, sparse=True, filters={"label": [
                f"{LABEL}=1", f"{LABEL_INSTANCE}={self.settings.instance}", LABEL_CONTAINER]})
        except (DockerException, requests.RequestException) as exc:
            log.warning("cannot list containers to reap: %s", exc)
            return []
        owners = {(c.attrs.get("Labels") or {}).get(LABEL_CONTAINER, "") for c in strays}
        gone = self.gone(owners - {self.home, ""})
        return [self.discard(c, labels) for c in strays
                if (labels := c.attrs.get("Labels") or {}).get(LABEL_CONTAINER) in gone]

    def gone(self, container_ids: set[str]) -> set[str]:
        """Which of these containers the engine no longer runs (one listing for all;
        none when the engine does not answer: they are looked at again next time)."""
        if not container_ids:
            return set()
        try:
            listed = self.client.containers.list(all=True, sparse=True,
                                                 filters={"id": sorted(container_ids)})
        except (DockerException, requests.RequestException):
            return set()
        alive = {c.id for c in listed if c.status not in GONE}
        return container_ids - alive
