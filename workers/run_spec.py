"""What a container run takes (a RunSpec: its plugin's PoolConfig and what the run adds),
shared by the cold and the prewarmed launches, and how its output is kept (Capture). How
it ended is manager.core.run_end's RunEnd."""

from __future__ import annotations

from dataclasses import dataclass, field

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
