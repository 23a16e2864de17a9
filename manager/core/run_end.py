"""A run's end in one frozen shape, from its container to its record: why it ended
(`End`), how its process exited (`Exit`: the code, the signal behind it, the OOM killer's
word), what it wrote and when. The cold and the prewarmed launches both say it (the
prewarmed one from its launcher's closing line, a cold one from the engine); classify
judges it into an `Outcome` (manager.core.records), which carries it to the record, to
Flower's summary and to the CLI's local run."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# SIGKILL, SIGTERM: the exits of a container stopped from outside (an engine's stop, a
# kill), and the launcher's own exit for either
SIGNAL_EXITS = frozenset({128 + 9, 128 + 15})


class End(StrEnum):
    """Why a container's run ended, as the run loop saw it (classify judges each)."""

    EXITED = "exited"  # its process exited by itself (or was killed from inside)
    TIMED_OUT = "timed_out"  # this worker stopped it at its timeout
    OUTPUT_CAP = "output_cap"  # this worker killed it at its first byte over a cap
    OOM = "oom"  # the kernel's OOM killer struck in its memory cgroup
    STOPPED = "stopped"  # the engine stopped it, not this worker (an engine shutdown)


def signal_of(code: int | None) -> int | None:
    """The signal an exit code stands for (a shell's and Docker's 128 + n), or None."""
    return code - 128 if code is not None and code > 128 else None


@dataclass(frozen=True)
class Exit:
    """How a container's process exited, as its engine or its launcher reports it."""

    code: int | None
    oom_killed: bool = False  # the engine's flag (it can lag behind the exit)

    @property
    def signal(self) -> int | None:
        return signal_of(self.code)

    @property
    def by_stop_or_kill(self) -> bool:
        """Ended by SIGTERM or SIGKILL: perhaps from outside (the run loop asks the engine)."""
        return self.code in SIGNAL_EXITS


@dataclass(frozen=True)
class RunEnd:
    """How one container's run ended: the cause, the exit code, what it wrote (each
    stream capped), and when (wall clock; ready_s is how long the container took to be
    ready for the run: near 0 when it was prewarmed)."""

    cause: End
    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    started_wall: float = 0.0
    finished_wall: float = 0.0
    ready_s: float = 0.0
    container_id: str | None = None
    warm: bool = False

    @property
    def signal(self) -> int | None:
        return signal_of(self.exit_code)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.finished_wall - self.started_wall)

    def record_fields(self) -> dict[str, object]:
        """What the run's record keeps of it."""
        return {
            "exit_code": self.exit_code, "started_at": self.started_wall,
            "finished_at": self.finished_wall, "duration_s": round(self.duration_s, 4),
            "container_start_s": round(self.ready_s, 4),
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "warm": self.warm, "container_id": self.container_id}
