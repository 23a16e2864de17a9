"""What the Celery task does after a delivery: it is Done (the run's final status, or why
it ran nothing), or it sends the run Again in a while (a new task message)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from manager.core.records import Status
from manager.core.runs import RunRequest


class Skipped(StrEnum):
    """A delivery that ran nothing: the run was already final, or has no record."""

    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Done:
    status: Status | Skipped
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return isinstance(self.status, Status) and self.status is not Status.SUCCEEDED


@dataclass(frozen=True)
class Again:
    request: RunRequest
    countdown: float


Next = Done | Again
