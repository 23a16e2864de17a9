"""What the Celery task does after a delivery: it is Done (the run's final status, or why
it ran nothing), or it sends the run Again in a while (a new task message)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from manager.core.records import Outcome, Status, shown_payload
from manager.core.runs import RunRequest

SHOWN_RESULTS = 3  # result events a summary names; the record has them all
STDERR_TAIL = 2000  # at most this much of a failed run's stderr ends a summary, whole lines


class Skipped(StrEnum):
    """A delivery that ran nothing: the run was already final, or has no record."""

    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Done:
    status: Status | Skipped
    reason: str | None = None
    # What Flower shows for the run: the task's result, or its failure's message.
    summary: str = ""

    @classmethod
    def of(cls, ended: Outcome) -> Done:
        return cls(ended.status, ended.reason, summarize(ended))

    @property
    def failed(self) -> bool:
        return isinstance(self.status, Status) and self.status is not Status.SUCCEEDED


def summarize(ended: Outcome) -> str:
    """A run's end in a few lines, for operators who look at Flower rather than the record:
    the status, time and path; then what it published, or the reason and the tail of the
    plugin's stderr (where a plugin says what went wrong)."""
    ran = ended.ran
    took = f" in {round(ran.duration_s, 4)}s ({'warm' if ran.warm else 'cold'})" if ran else ""
    if ended.status is Status.SUCCEEDED:
        results = ended.results
        lines = [f"succeeded{took}: {len(results)} result event(s)"]
        lines += [f"-> {r['topic']}/{r['event_type']} {shown_payload(r)}"
                  for r in results[:SHOWN_RESULTS]]
        if len(results) > SHOWN_RESULTS:
            lines.append(f"... and {len(results) - SHOWN_RESULTS} more")
        return "\n".join(lines)
    text = f"{ended.status.value}{took}: {ended.reason or ended.status.value}"
    stderr = ran.stderr.decode("utf-8", "replace").rstrip() if ran else ""
    if stderr:
        tail = stderr_tail(stderr)
        text += f"\nstderr{' (its last lines)' if tail != stderr else ''}:\n{tail}"
    return text


def stderr_tail(stderr: str) -> str:
    """The end of a plugin's stderr, from the start of a line: the last lines that fit in
    STDERR_TAIL characters (the last line's end when it alone is longer)."""
    if len(stderr) <= STDERR_TAIL:
        return stderr
    tail = stderr[-STDERR_TAIL:]
    start = tail.find("\n")
    return tail[start + 1:] if 0 <= start < len(tail) - 1 else tail


@dataclass(frozen=True)
class Again:
    request: RunRequest
    countdown: float


Next = Done | Again
