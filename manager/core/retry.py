"""One retry policy: capped exponential backoff, with jitter where many processes would
otherwise retry in step. Every wait-and-try-again loop of the project takes its delays
from a named Backoff here."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    first: float
    cap: float
    factor: float = 2.0
    jitter: bool = False  # each delay drawn from [half, all] of it

    def delay(self, attempt: int) -> float:
        """The wait before try `attempt + 1` (attempt counts from 0)."""
        plain = min(self.cap, self.first * self.factor ** min(attempt, 64))
        return random.uniform(0.5, 1.0) * plain if self.jitter else plain

    def delays(self) -> Iterator[float]:
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1


# Named policies (the caps that are operator settings are passed in where used).
REDIS_RECONNECT = Backoff(first=0.5, cap=10.0)  # a long-lived loop waiting for Redis
STORE_OUTCOME = Backoff(first=0.2, cap=5.0)  # a finished run's outcome, until Redis answers
RECORD_POLL = Backoff(first=0.01, cap=0.2, factor=1.5)  # reading a record until it is final
RESETTLE = Backoff(first=1.0, cap=30.0)  # a plugin directory still being written
CLI_RECORD_POLL = Backoff(first=0.05, cap=1.0, factor=1.5)  # the CLI reading a run's record
CLI_ENTRY_POLL = Backoff(first=0.05, cap=0.5, factor=1.5)  # ... what the listener did with an entry


def run_retry(cap: float) -> Backoff:
    """A run sent again (throttled, engine unusable, manifest retries): about 1, 2, 4 ...
    `cap` seconds, jittered so that waiting runs do not come back together."""
    return Backoff(first=1.0, cap=cap, jitter=True)
