"""The one run loop, for both launch strategies (a fresh container, or a prewarmed one
handed its run through the launcher): the timeout's timer, the output pump with its caps,
the end of the run, and its classification. A launch only says how the container came to
be running and where its output and its end come from."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import requests
from docker.errors import DockerException
from docker.utils.socket import SocketError

from manager.core.config import Settings
from manager.core.errors import SandboxUnavailable
from manager.core.records import Status
from manager.core.runs import RunUser
from workers.container import ContainerHandle
from workers.oom import OomWatch
from workers.spec import Capture, RunResult, RunSpec

WAIT_MARGIN_S = 60  # an engine's wait for a stopped container, beyond any run's timeout
LOST_STREAM = (OSError, SocketError, DockerException, requests.RequestException)


class Engine(Protocol):
    def oom_killed(self, watch: OomWatch | None) -> bool: ...

    def stopped_from_outside(self, container: ContainerHandle, result: RunResult,
                             state: dict[str, Any]) -> bool: ...


@dataclass
class Launched:
    """A running container and how to follow it to its end."""

    container: ContainerHandle
    frames: Iterable[tuple[bytes | None, bytes | None]]  # (stdout, stderr) chunks
    # Its end when known without asking the engine (the launcher's closing line); None
    # means ask the engine.
    state: Callable[[], dict[str, Any] | None] = lambda: None
    close: Callable[[], object] = lambda: None  # releases the output stream
    ready_at: float = field(default_factory=time.time)
    oom: OomWatch | None = None  # the kernel's OOM notifications for its memory cgroup


def execute(launched: Launched, spec: RunSpec, settings: Settings, engine: Engine,
            t0: float) -> RunResult:
    """Follows one started run to its classified result. Raises SandboxUnavailable when
    the engine went away, or stopped the container, without this worker asking."""
    result = RunResult(Status.RUNNING, started_at=t0, container_id=launched.container.id,
                       container_start_s=launched.ready_at - t0)
    timer = threading.Timer(spec.timeout, timed_out, (launched.container, result))
    timer.daemon = True
    timer.start()
    try:
        pump(launched.frames, launched.container, result, settings.output_cap_bytes)
        state = launched.state() or launched.container.wait(settings.max_timeout
                                                            + WAIT_MARGIN_S)
    except LOST_STREAM as exc:
        raise SandboxUnavailable(f"lost the container's stream: {exc}") from exc
    finally:
        timer.cancel()
        launched.close()
        oom = engine.oom_killed(launched.oom)  # the kernel's word (and its watch released)
    result.finished_at = time.time()
    result.exit_code = state.get("ExitCode")
    if oom:  # whatever the engine's flag says: it can lag behind the exit
        state = {**state, "OOMKilled": True}
    if engine.stopped_from_outside(launched.container, result, state):
        raise SandboxUnavailable("the container was stopped from outside this worker "
                                 "(an engine shutdown or a docker stop)")
    classify(result, state, spec, settings.output_cap_bytes)
    return result


def write_event(directory: Path, spec: RunSpec, user: RunUser) -> Path:
    """The run's event as a file in its private directory (EVENT_FILE) that its own uid
    alone may read, for either launch: a cold container mounts it, a prewarmed one reads
    its inbox."""
    path = directory / "event.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o400)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchown(fd, user.uid, user.gid)
        fh.write(spec.event_json)
    return path


def timed_out(container: ContainerHandle, result: RunResult) -> None:
    """The timeout: marked first, so the stop that follows is never taken for one from
    outside."""
    result.extra["timed_out"] = True
    container.stop()


def pump(frames: Iterable[tuple[bytes | None, bytes | None]], container: ContainerHandle,
         result: RunResult, cap: int) -> None:
    """Reads (stdout, stderr) chunks as they come, each stream capped; the first byte over
    a cap stops the container."""
    out, err = Capture(cap), Capture(cap)
    over = False
    for chunk_out, chunk_err in frames:
        if over:
            continue
        ok = (chunk_out is None or out.add(chunk_out)) and \
             (chunk_err is None or err.add(chunk_err))
        if not ok:
            over = True
            result.extra["output_limit"] = True
            # Killed from another thread: the engine answers the kill only once the
            # output in flight is drained, which this loop keeps doing.
            threading.Thread(target=container.kill, daemon=True).start()
    result.stdout, result.stderr = out.value(), err.value()
    result.stdout_truncated, result.stderr_truncated = out.truncated, err.truncated


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


def _last_line(data: bytes, limit: int = 300) -> str:
    """The last non-empty stderr line: usually the error a person wants to see."""
    for line in reversed(data[-8192:].decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()[:limit]
    return ""
