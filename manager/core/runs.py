"""The run request: everything a worker needs for one run, decided once at dispatch from
the registry's checked manifest (`PluginEntry.request`), and carried unchanged to the
sandbox (a frozen dataclass with to_dict/from_dict, like dramatiq's Message). The ids of
the events a run publishes are spelled here, once.

The worker applies these limits, clamped again to its own operator maxima; it never
takes limits from the bundle's plugin.yaml.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any

from manager.core.events import FAILURE, Event
from manager.core.groups import LimitSettings


def result_event_id(invocation_id: str, n: int) -> str:
    """Result `n` (from 1) of a run: derived from the run, so storing twice adds nothing."""
    return f"{invocation_id}-r{n}"


def failure_event_id(invocation_id: str) -> str:
    """The one failure event a run that did not succeed publishes."""
    return f"{invocation_id}-failed"


class RetryReason(StrEnum):
    """Why a run is sent again (the `reason` label of titan_retries_total)."""

    SANDBOX_UNAVAILABLE = "sandbox_unavailable"
    MANIFEST = "manifest"  # the plugin failed and its manifest allows `retries:`
    SECOND_DELIVERY = "second_delivery"
    ABANDONED = "abandoned"  # the sweeper found it abandoned (manager.bus.sweeper)


class Isolation(StrEnum):
    """What stands between a plugin and the host kernel: the container alone (runc), or
    gVisor's user-space kernel as well (runsc), with every container protection as before."""

    CONTAINER = "container"
    GVISOR = "gvisor"


@dataclass(frozen=True)
class RunUser:
    """The host identity one container runs as (workers.identity takes them): a uid of its own and
    the group every run shares."""

    uid: int
    gid: int
    lease: str = ""  # the token of the host-wide lease on the uid (also the container's label)

    @property
    def docker(self) -> str:
        return f"{self.uid}:{self.gid}"

    @property
    def label(self) -> str:
        return f"{self.uid}:{self.lease}"


@dataclass(frozen=True)
class RunLimits:
    timeout: int
    memory_bytes: int
    cpu_millis: int
    pids: int

    def clamped(self, ceiling: LimitSettings) -> RunLimits:
        """At most the operator's maxima, at least the engine's minima."""
        return RunLimits(
            timeout=max(1, min(self.timeout, ceiling.timeout)),
            memory_bytes=max(6 * 1024**2, min(self.memory_bytes, ceiling.memory_bytes)),
            cpu_millis=max(1, min(self.cpu_millis, ceiling.cpu_millis)),
            pids=max(1, min(self.pids, ceiling.pids)))


@dataclass(frozen=True)
class RunRequest:
    invocation_id: str
    plugin: str
    version: str
    digest: str
    image: str
    argv: tuple[str, ...]
    limits: RunLimits
    allowed_globs: tuple[str, ...]
    retries: int
    concurrency: int | None
    event: Event
    prewarm: bool = True
    origin: str = "bus"
    attempt: int = 1  # the attempt this message was sent for (the record counts them all)
    isolation: Isolation = Isolation.CONTAINER
    dispatched_at: float = 0.0  # when the event was matched and the run recorded (epoch s)
    weight: int = 1  # the manifest's: turns in the queue and share of slots (fair queueing)
    net_allow: tuple[str, ...] = ()  # host:port patterns granted through the egress proxy
    secrets: tuple[str, ...] = ()  # names of the secrets the run reads at /run/secrets
    # Since when (Redis's clock) this run's tries have found the engine away, and how many
    # did: those tries spend none of the manifest's `retries` (workers.delivery).
    engine_away_since: float = 0.0
    engine_waits: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The wire form (shallow: no deep copy on the hot path)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(event=self.event.to_dict(), argv=list(self.argv), limits=asdict(self.limits),
                    allowed_globs=list(self.allowed_globs), net_allow=list(self.net_allow),
                    secrets=list(self.secrets))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRequest:
        return cls(**{**data, "argv": tuple(data["argv"]),
                      "allowed_globs": tuple(data["allowed_globs"]),
                      "net_allow": tuple(data.get("net_allow") or ()),
                      "secrets": tuple(data.get("secrets") or ()),
                      "limits": RunLimits(**data["limits"]),
                      "isolation": Isolation(data.get("isolation") or Isolation.CONTAINER),
                      "event": Event.trusted(data["event"])})

    def next_attempt(self) -> RunRequest:
        return replace(self, attempt=self.attempt + 1)

    @property
    def source(self) -> str:
        return f"plugin:{self.plugin}@{self.version}"

    def result_event(self, n: int, obj: dict[str, Any]) -> Event:
        """Result `n` (from 1) of this run. Its id derives from the invocation, so storing
        the outcome twice can never publish it twice."""
        return self.event.caused(result_event_id(self.invocation_id, n), obj["topic"],
                                 obj["event_type"],
                                 obj["payload"], self.source)

    def failure_event(self, status: str, reason: str | None) -> Event:
        """`plugins.v1`/`invocation_failed` for a run that ended other than succeeded."""
        topic, event_type = FAILURE
        return self.event.caused(
            failure_event_id(self.invocation_id), topic, event_type,
            {"plugin": self.plugin, "invocation_id": self.invocation_id,
             "event_id": self.event.event_id, "status": status, "reason": reason or status},
            self.source)
