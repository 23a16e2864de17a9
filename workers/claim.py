"""Claim: a delivery takes its run. One round trip does the common case (RecordStore.claim:
the record as it was, a worker slot, the run marked running and held by this worker);
then the rarer ones: the run already ended (a duplicate delivery), a live process holds
it (a second delivery waits), its holder is gone (a takeover: a compare-and-set on the
holder), or no slot is free (throttled: it waits its turn). While a run is executing, the
process running it renews its hold (Keeper), so a killed worker's runs come free soon."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

import redis

from manager.core.observer import observer
from manager.core.records import InvocationRecord, Status
from manager.core.retry import run_retry
from manager.core.runs import RetryReason, RunRequest
from manager.core.slots import HELD_FOR_S, SlotGrant, Slots
from manager.core.wiring import Wiring
from workers.next import Again, Done, Next, Skipped

log = logging.getLogger(__name__)
CLAIMABLE = frozenset({Status.PENDING, Status.QUEUED, Status.THROTTLED, Status.RETRYING})
RUNNING_GRACE_S = 60  # beyond a waiting run's countdown, before the sweeper looks at it
HOLDER_RECHECK_S = 10  # a second delivery waits this long while the first holder lives
HOLD_RENEW_S = 3.0  # a run's hold (LEASE_TTL_S) is renewed this often while it runs


def claim(wiring: Wiring, req: RunRequest, worker: str) -> int | Next:
    """The attempt that starts now (the run is this delivery's, with a slot), or what the
    task does instead."""
    claimed = wiring.records.claim(
        wiring.slots.ask(req.plugin, req.invocation_id, req.concurrency, weight=req.weight),
        CLAIMABLE,
        running_due_in(), holder=worker, **running_fields(worker))
    record = claimed.record
    if record is None:
        log.warning("invocation %s has no record (expired?); dropping", req.invocation_id)
        return Done(Skipped.UNKNOWN)
    if claimed.grant is None and record.status.terminal:
        wiring.records.confirm_replicated(req.invocation_id)
        return Done(Skipped.DUPLICATE)
    if claimed.grant is None:  # running: another delivery holds it, or held it
        return take_over(wiring, req, record, worker)
    if claimed.grant is not SlotGrant.GRANTED:
        return throttle(wiring, req, record, claimed.grant)
    return started(req, record)


def running_due_in() -> float:
    """When the sweeper looks at a running run (seconds from now, Redis's clock): moved on
    with its hold (Slots.hold) for as long as its process lives, whatever its timeout."""
    return HELD_FOR_S


def running_fields(worker: str) -> dict[str, object]:
    return {"worker": worker, "worker_pid": os.getpid(), "started_at": time.time(),
            "reason": None}


def take_over(wiring: Wiring, req: RunRequest, record: InvocationRecord,
              worker: str) -> int | Next:
    """A second delivery of a running run: it waits while a live process holds the run,
    and otherwise takes the run over (a compare-and-set on the holder)."""
    if wiring.slots.holder(req.invocation_id) is not None:
        observer().retried(req.plugin, RetryReason.SECOND_DELIVERY)
        return Again(req, HOLDER_RECHECK_S)
    holder = record.worker or "?"
    grant = wiring.slots.acquire(req.plugin, req.invocation_id, req.concurrency,
                                 weight=req.weight)
    if grant is not SlotGrant.GRANTED:
        return throttle(wiring, req, record, grant)
    written = wiring.records.transition(
        req.invocation_id, Status.RUNNING, sources=frozenset({Status.RUNNING}),
        owner=holder, due_in=running_due_in(), increment="attempts",
        **running_fields(worker))
    if not written.applied:  # another delivery got there first
        wiring.slots.release(req.plugin, req.invocation_id)
        return Done(Skipped.DUPLICATE)
    wiring.slots.hold(req.plugin, req.invocation_id, worker, take=True)
    log.warning("invocation %s taken over from %s", req.invocation_id, holder)
    return started(req, record)


def started(req: RunRequest, record: InvocationRecord) -> int:
    """The attempt that starts now (counted by the claim); a first attempt's time in the
    queue is observed."""
    if record.attempts == 0:
        observer().claimed(req.plugin, time.time() - record.created_at)
    return record.attempts + 1


def throttle(wiring: Wiring, req: RunRequest, record: InvocationRecord,
             grant: SlotGrant) -> Again:
    """The run waits as `throttled`. Over its share for the first time, it goes to the
    back of the queue at once, behind the waiting run of another plugin; otherwise it
    comes back after a backoff."""
    countdown = (0.0 if grant is SlotGrant.SHARE and record.waits == 0 else
                 run_retry(wiring.settings.throttle_backoff_max).delay(record.waits))
    why = (f"waiting for a concurrency slot ({req.concurrency})"
           if grant is SlotGrant.CONCURRENCY else
           "waiting: the plugin holds its fair share of worker slots while other "
           "plugins wait")
    wiring.records.transition(req.invocation_id, Status.THROTTLED, increment="waits",
                              due_in=countdown + RUNNING_GRACE_S, reason=why)
    observer().throttled(req.plugin, grant.value)
    return Again(req, countdown)


class Keeper:
    """Per process: renews the hold of every run it is executing (its lease and its
    worker slot's), from one thread."""

    def __init__(self, slots: Slots, every_s: float = HOLD_RENEW_S) -> None:
        self.slots = slots
        self.every_s = every_s
        self.held: dict[str, tuple[str, str]] = {}  # invocation id -> (plugin, holder)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Its thread runs (again, should it have died)."""
        if self.thread is None or not self.thread.is_alive():
            self.stopping.clear()
            self.thread = threading.Thread(target=self._loop, name="titan-holds", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    @contextlib.contextmanager
    def holding(self, req: RunRequest, holder: str) -> Iterator[None]:
        with self.lock:
            self.held[req.invocation_id] = (req.plugin, holder)
            self.start()
        try:
            yield
        finally:
            with self.lock:
                self.held.pop(req.invocation_id, None)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self.every_s)
            with self.lock:
                held = dict(self.held)
            for invocation_id, (plugin, holder) in held.items():
                try:
                    self.slots.hold(plugin, invocation_id, holder)
                except redis.RedisError as exc:  # it expires by itself if Redis stays away
                    log.warning("renewing the hold of %s: %s", invocation_id, exc)
