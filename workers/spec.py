"""What a sandbox run takes (a RunSpec: its plugin's PoolConfig and what the run adds) and
what it gives back (RunResult), shared by the cold and the prewarmed paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from manager.core.records import Status
from manager.core.runs import RunLimits, RunUser


@dataclass(frozen=True)
class PoolConfig:
    """What a plugin's configuration fixes for its containers (host paths the engine can
    see). A prewarmed container serves a run only if its PoolConfig equals the run's."""

    plugin: str
    version: str
    digest: str
    image: str
    argv: tuple[str, ...]
    code_dir: str
    limits: RunLimits
    deps_dir: str | None = None
    read_only_dirs: tuple[str, ...] = ()
    runtime: str | None = None  # the engine's runtime (runsc for gVisor); None: its default


@dataclass(frozen=True)
class RunSpec:
    """One run: its plugin's configuration, and what the run adds (its id, its event, the
    event file and a payload copy: host paths the engine can see)."""

    config: PoolConfig
    invocation_id: str
    event_json: str
    event_file: str = ""
    payload: tuple[str, str] | None = None  # (private host copy, path inside the container)
    user: RunUser | None = None  # a cold container's identity (a warm one has its own)
    accounts: dict[str, str] = field(default_factory=dict)  # its /etc/passwd, /etc/group

    @property
    def plugin(self) -> str:
        return self.config.plugin

    @property
    def image(self) -> str:
        return self.config.image

    @property
    def limits(self) -> RunLimits:
        return self.config.limits

    @property
    def timeout(self) -> int:
        return self.config.limits.timeout

    @property
    def memory_bytes(self) -> int:
        return self.config.limits.memory_bytes


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


class Capture:
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
