"""What a container run takes (a RunSpec: its plugin's PoolConfig and what the run adds)
and how it ended (RunEnd), shared by the cold and the prewarmed launches."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

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
    # Where a run's payload file may lie (its runs name one): a prewarmed container has an
    # empty private directory of its own mounted at each, for the run's checked copy.
    payload_dirs: tuple[str, ...] = ()
    # The egress network its containers join (a plugin with permissions.net.allow), or
    # None: network_mode none.
    network: str | None = None
    # Where its runs find their secrets (/run/secrets): a private directory is mounted.
    secrets: bool = False


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
    proxy_env: tuple[tuple[str, str], ...] = ()  # its egress credentials (HTTP_PROXY, ...)
    grant_file: str | None = None  # its egress grant, pinned to its container's address
    secrets: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)  # name, value

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


class End(StrEnum):
    """Why a container's run ended, as the run loop saw it (classify judges each)."""

    EXITED = "exited"  # its process exited by itself (or was killed from inside)
    TIMED_OUT = "timed_out"  # this worker stopped it at its timeout
    OUTPUT_CAP = "output_cap"  # this worker killed it at its first byte over a cap
    OOM = "oom"  # the kernel's OOM killer struck in its memory cgroup
    STOPPED = "stopped"  # the engine stopped it, not this worker (an engine shutdown)


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
    def duration_s(self) -> float:
        return max(0.0, self.finished_wall - self.started_wall)


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
