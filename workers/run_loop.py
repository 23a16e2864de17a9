"""The run loop, the same for both launches: follows a launched container to its end and
says why it ended (RunEnd). It owns the timeout's timer, reads the output as it comes
with each stream capped (the first byte over a cap kills the container), takes the end
from the launcher's closing line or else from the engine, and asks the kernel whether its
OOM killer struck. A launch only says how the container came to be running and where its
output and its end come from (workers.cold, workers.warm)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from manager.core.errors import SandboxUnavailable
from manager.core.run_end import End, Exit, RunEnd
from workers.container import ENGINE_ERRORS, STDERR, STDOUT, ContainerHandle
from workers.engine import Engine
from workers.oom import OomWatch
from workers.run_spec import Capture, RunSpec

WAIT_MARGIN_S = 60  # an engine's wait for a stopped container, beyond the run's timeout


@dataclass
class Launched:
    """A running container and how to follow it to its end."""

    container: ContainerHandle
    output: Iterator[tuple[int, bytes]]  # (stream, payload) frames of the run's output
    started_wall: float
    ready_wall: float  # when it was ready for the run (at once when prewarmed)
    exit_state: Callable[[], Exit | None] = lambda: None  # the launcher's word
    oom: OomWatch | None = None
    warm: bool = False


def follow(launched: Launched, spec: RunSpec, cap: int, engine: Engine) -> RunEnd:
    """Follows one started run to its end, each output stream capped at `cap` bytes.
    Raises SandboxUnavailable when the engine went away with the container's stream."""
    container = launched.container
    timed_out = threading.Event()

    def timeout() -> None:
        timed_out.set()  # first: the stop that follows is never taken for one from outside
        container.stop()

    timer = threading.Timer(spec.timeout, timeout)
    timer.daemon = True
    timer.start()
    try:
        out, err = read_capped(launched.output, container, cap)
        exited = launched.exit_state() or container.wait(spec.timeout + WAIT_MARGIN_S)
    except ENGINE_ERRORS as exc:
        raise SandboxUnavailable(f"lost the container's stream: {exc}") from exc
    finally:
        timer.cancel()
        oom = engine.oom_killed(launched.oom)  # the kernel's word (and its watch released)
    finished_wall = time.time()
    if timed_out.is_set():
        cause = End.TIMED_OUT
    elif out.truncated or err.truncated:
        cause = End.OUTPUT_CAP
    elif oom or exited.oom_killed:  # the engine's flag can lag behind the exit
        cause = End.OOM
    elif exited.by_stop_or_kill and engine.stopped_from_outside(container,
                                                                launched.started_wall):
        cause = End.STOPPED
    else:
        cause = End.EXITED
    return RunEnd(cause, exited.code, out.value(), err.value(), out.truncated, err.truncated,
                  launched.started_wall, finished_wall,
                  max(0.0, launched.ready_wall - launched.started_wall), container.id,
                  launched.warm)


def read_capped(output: Iterator[tuple[int, bytes]], container: ContainerHandle,
                cap: int) -> tuple[Capture, Capture]:
    """Reads (stream, payload) frames as they come, each stream capped; the first byte
    over a cap kills the container (from another thread: the engine answers the kill only
    once the output in flight is drained, which this loop keeps doing)."""
    captured = {STDOUT: Capture(cap), STDERR: Capture(cap)}
    over = False
    for stream, data in output:
        if over or stream not in captured:
            continue
        if not captured[stream].add(data):
            over = True
            threading.Thread(target=container.kill, daemon=True).start()
    return captured[STDOUT], captured[STDERR]
