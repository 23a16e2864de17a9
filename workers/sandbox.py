"""One plugin run in one fresh, locked-down container -> RunResult (SPEC §4).

The container is created with every protection set, attached to before it starts (so no
output is missed and none goes to a log driver on the host's disk), watched by a timer that
stops it at the timeout, read while it streams with stdout/stderr capped, and removed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount, Ulimit

from manager.core.config import RUN_GID, RUN_UID, Settings
from manager.core.errors import SandboxUnavailable
from manager.core.records import Status
from workers.spec import Capture, RunResult, RunSpec

log = logging.getLogger(__name__)

LABEL = "titan.managed"
LABEL_INSTANCE = "titan.instance"
LABEL_HOST = "titan.host"
LABEL_PID = "titan.worker_pid"
LABEL_START = "titan.worker_start"  # with the pid: the owner, safe against pid reuse
LABEL_INVOCATION = "titan.invocation"
LABEL_PLUGIN = "titan.plugin"
LABEL_POOL = "titan.pool"  # a prewarmed container, owned by its worker process
CODE_DIR = "/plugin"
DEPS_DIR = "/titan/deps"
EVENT_PATH = "/titan/event.json"
SANDBOX_USER = f"{RUN_UID}:{RUN_GID}"
STOP_GRACE_S = 2
MAX_ENV_EVENT = 96 * 1024  # larger events are read from EVENT_FILE only
SIGNAL_EXITS = (128 + 9, 128 + 15)  # SIGKILL, SIGTERM: what a stop from outside ends with
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


class Sandbox:
    """Runs RunSpecs; holds the process's Docker client and the labels that mark its work."""

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None) -> None:
        self._client = client
        self._pulls: dict[str, float] = {}
        self.settings = settings
        self.base_labels = {LABEL: "1", LABEL_INSTANCE: settings.instance,
                            LABEL_HOST: settings.worker_name}

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

    def shm_size(self, spec: RunSpec) -> int:
        return min(self.settings.shm_bytes, spec.memory_bytes // 8)

    def tmpfs_size(self, spec: RunSpec) -> int:
        """tmpfs pages are charged to the container's memory: filling /tmp (at most half
        of it) and /dev/shm (at most an eighth) must end in ENOSPC, not in an OOM kill."""
        return min(self.settings.tmpfs_bytes, spec.memory_bytes // 2)

    def container_options(self, spec: RunSpec) -> dict[str, Any]:
        """The SPEC §4 protections; a manifest has no way to loosen any of them."""
        s, limits = self.settings, spec.limits
        env = {"EVENT_FILE": EVENT_PATH, "PLUGIN_NAME": spec.plugin,
               "PLUGIN_VERSION": spec.version, "INVOCATION_ID": spec.invocation_id,
               "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        if len(spec.event_json.encode()) <= MAX_ENV_EVENT:
            env["EVENT_DATA"] = spec.event_json
        mounts = [_bind(CODE_DIR, spec.code_dir), _bind(EVENT_PATH, spec.event_file)]
        if spec.deps_dir:
            mounts.append(_bind(DEPS_DIR, spec.deps_dir))
            env["PYTHONPATH"] = DEPS_DIR
        mounts += [_bind(d, d) for d in spec.read_only_dirs]
        if spec.payload:
            mounts.append(_bind(spec.payload[1], spec.payload[0]))
        tmp = "rw,noexec,nosuid,nodev,mode=1777"
        return {
            "image": spec.image, "command": list(spec.argv), "environment": env,
            "working_dir": CODE_DIR, "user": SANDBOX_USER, "network_mode": "none",
            "read_only": True, "mounts": mounts,
            "tmpfs": {"/tmp": f"{tmp},size={self.tmpfs_size(spec)},nr_inodes={s.tmpfs_inodes}",
                      "/dev/shm": f"{tmp},size={self.shm_size(spec)},nr_inodes=256"},
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
            "pids_limit": max(1, limits.pids), "mem_limit": limits.memory_bytes,
            "memswap_limit": limits.memory_bytes, "nano_cpus": limits.cpu_millis * 1_000_000,
            "ulimits": [Ulimit(name="nofile", soft=s.nofile_limit, hard=s.nofile_limit),
                        Ulimit(name="fsize", soft=s.fsize_bytes, hard=s.fsize_bytes),
                        Ulimit(name="core", soft=0, hard=0)],
            "init": True, "ipc_mode": "none", "log_config": {"type": "none", "config": {}},
            "stdin_open": False, "tty": False, "hostname": "plugin",
            "labels": {**self.base_labels, **owner_labels(),
                       LABEL_INVOCATION: spec.invocation_id, LABEL_PLUGIN: spec.plugin},
        }

    def run(self, spec: RunSpec) -> RunResult:
        """Runs one container to completion. Raises SandboxUnavailable only when the engine
        (or the image) cannot be used, so the caller may retry; plugin failures are results."""
        t0 = time.time()
        try:
            container = self._create(spec)
        except ImageNotFound:  # not an outage: retrying cannot help
            return RunResult(Status.FAILED, started_at=t0, finished_at=time.time(),
                             reason=self.image_missing(spec.image))
        except APIError as exc:
            if exc.is_client_error():  # the engine refused this container: retrying won't help
                return RunResult(Status.FAILED, started_at=t0, finished_at=time.time(),
                                 reason=f"the Docker engine refused the container: "
                                        f"{exc.explanation or exc}")
            raise SandboxUnavailable(f"cannot create container: {exc}") from exc
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"cannot create container: {exc}") from exc
        try:
            return self._run_created(container, spec, t0)
        finally:
            self._remove(container)

    def _create(self, spec: RunSpec) -> Any:
        """Creates the container; an absent image is pulled once when a registry answers."""
        try:
            return self.client.containers.create(**self.container_options(spec))
        except ImageNotFound:
            if not self._pull(spec.image):
                raise
            return self.client.containers.create(**self.container_options(spec))

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

    def images(self) -> list[str]:
        """The image names (repo:tag) present on this engine."""
        return sorted({t for img in self.client.images.list() for t in img.tags})

    def _run_created(self, container: Any, spec: RunSpec, t0: float) -> RunResult:
        result = RunResult(Status.RUNNING, started_at=t0, container_id=container.id)
        try:
            stream = self.client.api.attach(container.id, stdout=True, stderr=True,
                                            stream=True, demux=True, logs=False)
            container.start()
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"cannot start container: {exc}") from exc
        result.container_start_s = time.time() - t0
        timer = threading.Timer(spec.timeout, self._stop, (container, result))
        timer.daemon = True
        timer.start()
        try:
            self.pump(stream, container, result)
            state = self._wait(container)
        finally:
            timer.cancel()
            stream.close()
        return self.finish(result, state, spec, container)

    def pump(self, stream: Iterable[tuple[bytes | None, bytes | None]], container: Any,
             result: RunResult) -> None:
        """Reads (stdout, stderr) chunks as they come, each stream capped; the first byte
        over a cap stops the container."""
        out, err = Capture(self.settings.output_cap_bytes), Capture(self.settings.output_cap_bytes)
        over = False
        for chunk_out, chunk_err in stream:
            if over:
                continue
            ok = (chunk_out is None or out.add(chunk_out)) and \
                 (chunk_err is None or err.add(chunk_err))
            if not ok:
                over = True
                result.extra["output_limit"] = True
                # Killed from another thread: the engine answers the kill only once the
                # output in flight is drained, which this loop keeps doing.
                threading.Thread(target=self._kill, args=(container,), daemon=True).start()
        result.stdout, result.stderr = out.value(), err.value()
        result.stdout_truncated, result.stderr_truncated = out.truncated, err.truncated

    def finish(self, result: RunResult, state: dict[str, Any], spec: RunSpec,
               container: Any) -> RunResult:
        """Classifies a finished container. A container stopped by anything but this
        worker (an engine shutdown, a `docker stop` from outside) is not the plugin's
        failure: SandboxUnavailable, so the run is retried."""
        result.finished_at = time.time()
        result.exit_code = state.get("ExitCode")
        if self.stopped_from_outside(container, result, state):
            raise SandboxUnavailable("the container was stopped from outside this worker "
                                     "(an engine shutdown or a docker stop)")
        classify(result, state, spec, self.settings.output_cap_bytes)
        return result

    def stopped_from_outside(self, container: Any, result: RunResult,
                             state: dict[str, Any]) -> bool:
        """A signal death this worker did not cause (its timeout, its output cap), that the
        engine reports as its own kill of the container. Asked only for such deaths."""
        if result.extra.get("timed_out") or result.extra.get("output_limit") or \
                state.get("OOMKilled") or result.exit_code not in SIGNAL_EXITS:
            return False
        try:  # the engine logs its kill just after it signals: look a moment ahead
            events = self.client.events(since=int(result.started_at) - 1,
                                        until=time.time() + KILL_EVENT_WAIT_S,
                                        filters={"container": container.id,
                                                 "event": ["kill", "stop", "die"]},
                                        decode=True)
            return any(e.get("Action") in ("kill", "stop") for e in events)
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"the engine went away with the container: {exc}") from exc

    def _wait(self, container: Any) -> dict[str, Any]:
        """The container's final state; inspected only when it did not exit cleanly
        (OOMKilled is only in the inspect data), sparing a round trip per good run."""
        try:
            code = container.wait(timeout=self.settings.max_timeout + 60).get("StatusCode")
            if code == 0:
                return {"ExitCode": 0, "OOMKilled": False}
            container.reload()
            return container.attrs.get("State", {})
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"lost the container while waiting: {exc}") from exc

    def _stop(self, container: Any, result: RunResult) -> None:
        """Timeout: SIGTERM, then SIGKILL after a short grace period."""
        result.extra["timed_out"] = True
        try:
            container.stop(timeout=STOP_GRACE_S)
        except (DockerException, requests.RequestException) as exc:
            log.warning("stopping %s after timeout failed: %s", container.id[:12], exc)
            self._kill(container)

    @staticmethod
    def _kill(container: Any) -> None:
        try:
            container.kill()
        except (DockerException, requests.RequestException) as exc:
            log.debug("kill %s: %s", container.id[:12], exc)

    def _remove(self, container: Any) -> bool:
        """Removes a container (killing it); False when the engine did not do it."""
        try:
            container.remove(force=True)
        except NotFound:
            pass
        except (DockerException, requests.RequestException) as exc:
            log.warning("could not remove container %s: %s", container.id[:12], exc)
            return False
        return True

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
             held: Callable[[], set[str]] | None = None) -> list[str]:
        """Removes this host's containers that no run is using: those whose worker process
        is gone, and those of `children` (this worker's processes) whose invocation is not
        in `held()` (left over by a start or remove that failed while the engine was away).
        `held` is read after the containers are listed, so a run accepted meanwhile is
        never mistaken for waste."""
        try:
            containers = self.mine({})
        except (DockerException, requests.RequestException) as exc:
            log.warning("cannot list containers to reap: %s", exc)
            return []
        in_use = held() if held else set()
        reaped = []
        for c in containers:
            labels = c.attrs.get("Labels") or {}
            pid = int(labels.get(LABEL_PID, "0") or 0)
            alive = _pid_alive(pid) and labels.get(LABEL_START) in (None, _started(pid))
            invocation = labels.get(LABEL_INVOCATION, "")
            mine = children is not None and pid in children
            pooled = labels.get(LABEL_POOL) == "1"  # its process removes it after use
            if alive and (pooled or not (mine and invocation not in in_use)):
                continue
            self._remove(c)
            reaped.append(invocation or c.id[:12])
        return reaped


def classify(result: RunResult, state: dict[str, Any], spec: RunSpec, output_cap: int) -> None:
    """A finished container's status and reason, from what this worker saw (its timeout,
    its output cap) and the state the engine or the launcher reported. Pure."""
    code = result.exit_code
    if result.extra.get("timed_out"):
        result.status, result.reason = Status.TIMEOUT, f"timed out after {spec.timeout}s"
    elif result.extra.get("output_limit"):
        which = "stdout" if result.stdout_truncated else "stderr"
        result.status = Status.OUTPUT_LIMIT
        result.reason = f"{which} exceeded {output_cap} bytes"
    elif state.get("OOMKilled"):
        result.status = Status.OOM
        result.reason = f"killed: out of memory (limit {spec.memory_bytes} bytes)"
    elif code != 0:
        result.status = Status.FAILED
        signal_note = f" (killed by signal {code - 128})" if code and code > 128 else ""
        last = _last_line(result.stderr)
        result.reason = f"exited with code {code}{signal_note}" + (f": {last}" if last else "")
    else:
        result.status = Status.SUCCEEDED


def _bind(target: str, source: str) -> Mount:
    """A read-only bind mount that does not carry the mounts below its source along."""
    mount = Mount(target, source, type="bind", read_only=True)
    mount["BindOptions"] = {"NonRecursive": True}
    return mount


def _last_line(data: bytes, limit: int = 300) -> str:
    """The last non-empty stderr line: usually the error a person wants to see."""
    for line in reversed(data[-8192:].decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()[:limit]
    return ""


def owner_labels() -> dict[str, str]:
    """This process as the owner of a container: its pid and when it started."""
    return {LABEL_PID: str(os.getpid()), LABEL_START: _started(os.getpid())}


def _started(pid: int) -> str:
    """A process's start time (clock ticks since boot): a reused pid gets another."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


