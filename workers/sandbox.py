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
from dataclasses import dataclass, field
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount, Ulimit

from manager.config import Settings
from manager.errors import SandboxUnavailable
from manager.records import Status

log = logging.getLogger(__name__)

LABEL = "titan.managed"
LABEL_INSTANCE = "titan.instance"
LABEL_HOST = "titan.host"
LABEL_PID = "titan.worker_pid"
LABEL_INVOCATION = "titan.invocation"
LABEL_PLUGIN = "titan.plugin"
CODE_DIR = "/plugin"
DEPS_DIR = "/titan/deps"
EVENT_PATH = "/titan/event.json"
SANDBOX_USER = "65534:65534"
STOP_GRACE_S = 2
MAX_ENV_EVENT = 96 * 1024  # larger events are read from EVENT_FILE only


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; host paths are paths the Docker engine can see."""

    invocation_id: str
    plugin: str
    version: str
    image: str
    argv: list[str]
    code_dir: str
    event_json: str
    event_file: str
    timeout: int
    memory_bytes: int
    cpu_millis: int
    deps_dir: str | None = None
    read_only_dirs: tuple[str, ...] = ()


@dataclass
class RunResult:
    status: Status
    reason: str | None = None
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    started_at: float = 0.0
    finished_at: float = 0.0
    container_start_s: float = 0.0
    container_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.finished_at - self.started_at)


class _Capture:
    """Keeps up to `cap` bytes of a stream and notes whether more came."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, data: bytes) -> bool:
        """Returns False once the cap is exceeded."""
        room = self.cap - self.size
        if len(data) > room:
            if room > 0:
                self.chunks.append(data[:room])
                self.size += room
            self.truncated = True
            return False
        self.chunks.append(data)
        self.size += len(data)
        return True

    def value(self) -> bytes:
        return b"".join(self.chunks)


def connect_docker() -> docker.DockerClient:
    """One client per worker process (DOCKER_HOST and friends honoured)."""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except (DockerException, requests.RequestException) as exc:
        raise SandboxUnavailable(f"Docker engine unreachable: {exc}") from exc


class Sandbox:
    """Runs RunSpecs; holds the process's Docker client and the labels that mark its work."""

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None) -> None:
        self._client = client
        self.settings = settings
        self.base_labels = {LABEL: "1", LABEL_INSTANCE: settings.instance,
                            LABEL_HOST: settings.worker_name}

    @property
    def client(self) -> docker.DockerClient:
        """Connected on first use, then reused for every run of this process."""
        if self._client is None:
            self._client = connect_docker()
        return self._client

    def tmpfs_size(self, spec: RunSpec) -> int:
        """tmpfs pages are charged to the container's memory: filling /tmp must end in
        ENOSPC, not in an OOM kill, so it gets at most half of the memory limit."""
        return min(self.settings.tmpfs_bytes, spec.memory_bytes // 2)

    def container_options(self, spec: RunSpec) -> dict[str, Any]:
        """The SPEC §4 protections; a manifest has no way to loosen any of them."""
        s = self.settings
        env = {"EVENT_FILE": EVENT_PATH, "PLUGIN_NAME": spec.plugin,
               "PLUGIN_VERSION": spec.version, "INVOCATION_ID": spec.invocation_id,
               "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        if len(spec.event_json.encode()) <= MAX_ENV_EVENT:
            env["EVENT_DATA"] = spec.event_json
        mounts = [Mount(CODE_DIR, spec.code_dir, type="bind", read_only=True),
                  Mount(EVENT_PATH, spec.event_file, type="bind", read_only=True)]
        if spec.deps_dir:
            mounts.append(Mount(DEPS_DIR, spec.deps_dir, type="bind", read_only=True))
            env["PYTHONPATH"] = DEPS_DIR
        mounts += [Mount(d, d, type="bind", read_only=True) for d in spec.read_only_dirs]
        return {
            "image": spec.image, "command": spec.argv, "environment": env,
            "working_dir": CODE_DIR, "user": SANDBOX_USER, "network_mode": "none",
            "read_only": True, "mounts": mounts,
            "tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={self.tmpfs_size(spec)},"
                              f"nr_inodes={s.tmpfs_inodes},mode=1777"},
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
            "pids_limit": max(1, s.pids_limit), "mem_limit": spec.memory_bytes,
            "memswap_limit": spec.memory_bytes, "nano_cpus": spec.cpu_millis * 1_000_000,
            "ulimits": [Ulimit(name="nofile", soft=s.nofile_limit, hard=s.nofile_limit),
                        Ulimit(name="fsize", soft=s.fsize_bytes, hard=s.fsize_bytes),
                        Ulimit(name="core", soft=0, hard=0)],
            "init": True, "ipc_mode": "private", "log_config": {"type": "none", "config": {}},
            "stdin_open": False, "tty": False, "hostname": "plugin",
            "labels": {**self.base_labels, LABEL_PID: str(os.getpid()),
                       LABEL_INVOCATION: spec.invocation_id, LABEL_PLUGIN: spec.plugin},
        }

    def run(self, spec: RunSpec) -> RunResult:
        """Runs one container to completion. Raises SandboxUnavailable only when the engine
        (or the image) cannot be used, so the caller may retry; plugin failures are results."""
        t0 = time.time()
        try:
            container = self.client.containers.create(**self.container_options(spec))
        except ImageNotFound as exc:
            raise SandboxUnavailable(f"runtime image {spec.image!r} is not present on this "
                                     "worker's Docker engine", image=spec.image) from exc
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

    def _run_created(self, container: Any, spec: RunSpec, t0: float) -> RunResult:
        cap = self.settings.output_cap_bytes
        out, err = _Capture(cap), _Capture(cap)
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
            self._pump(stream, out, err, container, result)
            state = self._wait(container)
        finally:
            timer.cancel()
            stream.close()
        result.finished_at = time.time()
        result.stdout, result.stderr = out.value(), err.value()
        result.stdout_truncated, result.stderr_truncated = out.truncated, err.truncated
        result.exit_code = state.get("ExitCode")
        self._classify(result, state, spec)
        return result

    def _pump(self, stream: Any, out: _Capture, err: _Capture, container: Any,
              result: RunResult) -> None:
        """Reads frames as they come; the first byte over a cap stops the container."""
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

    def _classify(self, result: RunResult, state: dict[str, Any], spec: RunSpec) -> None:
        code = result.exit_code
        if result.extra.get("timed_out"):
            result.status, result.reason = Status.TIMEOUT, f"timed out after {spec.timeout}s"
        elif result.extra.get("output_limit"):
            which = "stdout" if result.stdout_truncated else "stderr"
            result.status = Status.OUTPUT_LIMIT
            result.reason = f"{which} exceeded {self.settings.output_cap_bytes} bytes"
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

    def _remove(self, container: Any) -> None:
        try:
            container.remove(force=True)
        except NotFound:
            pass
        except (DockerException, requests.RequestException) as exc:
            log.warning("could not remove container %s: %s", container.id[:12], exc)

    def reap_orphans(self, live_pids: set[int] | None = None) -> list[str]:
        """Kills and removes this host's containers whose worker process is gone."""
        filters = {"label": [f"{LABEL}=1", f"{LABEL_INSTANCE}={self.settings.instance}",
                             f"{LABEL_HOST}={self.settings.worker_name}"]}
        reaped = []
        try:
            containers = self.client.containers.list(all=True, filters=filters)
        except (DockerException, requests.RequestException) as exc:
            log.warning("cannot list containers to reap orphans: %s", exc)
            return reaped
        for c in containers:
            pid = int(c.labels.get(LABEL_PID, "0") or 0)
            if live_pids is not None and pid in live_pids:
                continue
            if live_pids is None and pid and pid != os.getpid() and _pid_alive(pid):
                continue
            self._remove(c)
            reaped.append(c.labels.get(LABEL_INVOCATION, c.id[:12]))
        return reaped


def _last_line(data: bytes, limit: int = 300) -> str:
    """The last non-empty stderr line: usually the error a person wants to see."""
    for line in reversed(data[-8192:].decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()[:limit]
    return ""


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


