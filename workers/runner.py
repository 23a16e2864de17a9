"""One invocation from task to record: claim, concurrency slot, code, permissions,
requirements, sandbox, outcome. Returns what the task should do next; every record
change goes through RecordStore's transitions."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from enum import StrEnum

import redis

from manager.core import metrics
from manager.core.beats import WorkerBeat
from manager.core.config import Settings
from manager.core.errors import BundleError, NotReplicated, SandboxUnavailable
from manager.core.keys import Keys
from manager.core.record_store import RecordStore
from manager.core.records import InvocationRecord, Status
from manager.core.retry import run_retry
from manager.core.runs import RunRequest
from manager.core.slots import Grant, Slots
from manager.plugins.registry import Registry
from workers.container import STOP_GRACE_S
from workers.execution import Execution, Refused
from workers.plugin_cache import PluginCache
from workers.pool import WarmPool
from workers.results import Outcomes, decide, persist, without_run
from workers.sandbox import Sandbox

log = logging.getLogger(__name__)
RETRYABLE = {Status.FAILED, Status.TIMEOUT, Status.OOM}  # only with `retries:` in the manifest
RUNNING_GRACE_S = 60  # beyond timeout + stop grace, before the sweeper looks at a run
HOLDER_RECHECK_S = 10  # a second delivery waits this long while the first holder lives
REPLICATION_RECHECK_S = 5  # a stored outcome no replica confirmed yet is looked at again
CLAIMABLE = frozenset({Status.PENDING, Status.QUEUED, Status.THROTTLED, Status.RETRYING})


class Skipped(StrEnum):
    """A delivery that ran nothing: the run was already final, or has no record."""

    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


class RetryReason(StrEnum):
    """Why a run is sent again (the `reason` label of titan_retries_total)."""

    SANDBOX_UNAVAILABLE = "sandbox_unavailable"
    MANIFEST = "manifest"  # the plugin failed and its manifest allows `retries:`
    SECOND_DELIVERY = "second_delivery"


@dataclass(frozen=True)
class Finished:
    """This delivery is done: the run's final status (or why it ran nothing) and reason."""

    status: Status | Skipped
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return isinstance(self.status, Status) and self.status is not Status.SUCCEEDED


@dataclass(frozen=True)
class Later:
    """Send `request` again in `countdown` seconds (a new task message)."""

    request: RunRequest
    countdown: float


class Runner:
    """Per worker process: owns the Sandbox (one Docker client) and the host's caches."""

    def __init__(self, conn: redis.Redis, settings: Settings, sandbox: Sandbox) -> None:
        self.conn = conn
        self.settings = settings
        self.sandbox = sandbox
        self.keys = Keys(settings.key_prefix)
        self.records = RecordStore(conn, settings)
        self.outcomes = Outcomes(conn, settings)
        registry = Registry(conn, settings)
        self.cache = PluginCache(registry, settings)
        self.pool = WarmPool(settings, sandbox, lambda: {
            e.digest for e in registry.entries().values() if e.digest})
        self.execution = Execution(settings, sandbox, self.cache, self.pool)
        self.slots = Slots(conn, self.keys, settings.plugin_share)

    def execute(self, req: RunRequest, worker: str) -> Finished | Later:
        """Runs one delivery of a request. Returns the final status (or why it ran nothing), or
        Later when the run must wait (throttled, engine unusable, manifest retries, a second
        delivery while the first holder still lives, or an outcome no replica confirmed
        yet: its message is acknowledged only once one does, without holding a slot)."""
        try:
            return self.deliver(req, worker)
        except NotReplicated as exc:
            log.warning("invocation %s: %s; confirming again in %ss", req.invocation_id,
                        exc.message, REPLICATION_RECHECK_S)
            return Later(req, REPLICATION_RECHECK_S)

    def deliver(self, req: RunRequest, worker: str) -> Finished | Later:
        """One round trip claims the run: its record as it was, a slot, and the run marked
        running; the rest is for the rare cases (final already, held by another worker)."""
        claimed = self.records.claim(
            self.slots.ask(req.plugin, req.invocation_id, req.concurrency), CLAIMABLE,
            self.running_deadline(req), **self.running_fields(worker))
        record = claimed.record
        if record is None:
            log.warning("invocation %s has no record (expired?); dropping", req.invocation_id)
            return Finished(Skipped.UNKNOWN)
        if claimed.grant is None and record.status.terminal:
            self.records.confirm_replicated(req.invocation_id)
            return Finished(Skipped.DUPLICATE)
        if claimed.grant is None:  # running: another delivery holds it, or held it
            return self.take_over(req, record, worker)
        if claimed.grant is not Grant.GRANTED:
            return self.throttle(req, record, claimed.grant)
        return self.run_holding_slot(req, self.started(req, record))

    def running_deadline(self, req: RunRequest) -> float:
        return time.time() + req.limits.timeout + STOP_GRACE_S + RUNNING_GRACE_S

    @staticmethod
    def running_fields(worker: str) -> dict[str, object]:
        return {"worker": worker, "worker_pid": os.getpid(), "started_at": time.time(),
                "reason": None}

    def take_over(self, req: RunRequest, record: InvocationRecord,
                  worker: str) -> Finished | Later:
        """A second delivery of a running run: it waits while the first holder lives, and
        otherwise takes the run over (a compare-and-set on the holder)."""
        if self.holder_alive(record):
            metrics.RETRIES.labels(plugin=req.plugin, reason=RetryReason.SECOND_DELIVERY).inc()
            return Later(req, HOLDER_RECHECK_S)
        holder = record.worker or "?"
        grant = self.slots.acquire(req.plugin, req.invocation_id, req.concurrency)
        if grant is not Grant.GRANTED:
            return self.throttle(req, record, grant)
        outcome = self.records.transition(
            req.invocation_id, Status.RUNNING, sources=frozenset({Status.RUNNING}),
            owner=holder, deadline=self.running_deadline(req), increment="attempts",
            **self.running_fields(worker))
        if not outcome.applied:  # another delivery got there first
            self.release_slot(req)
            return Finished(Skipped.DUPLICATE)
        log.warning("invocation %s taken over from %s", req.invocation_id, holder)
        return self.run_holding_slot(req, self.started(req, record))

    def holder_alive(self, record: InvocationRecord) -> bool:
        """True while the worker that claimed the run reports it as active."""
        beat = WorkerBeat.get(self.conn, self.keys, record.worker or "")
        return beat is not None and record.invocation_id in beat.held

    def started(self, req: RunRequest, record: InvocationRecord) -> int:
        """The attempt that starts now (counted by the claim); a first attempt's time in
        the queue is observed."""
        if record.attempts == 0:
            metrics.QUEUE_WAIT.labels(plugin=req.plugin).observe(
                max(0.0, time.time() - record.created_at))
        return record.attempts + 1

    def run_holding_slot(self, req: RunRequest, attempt: int) -> Finished | Later:
        """Runs the claimed attempt; its slot is freed with its stored outcome (Finished),
        else here (another attempt follows, or an error). Only then does the prewarm pool
        remove the used container and start its replacement: neither competes with the
        run's last steps for the CPU."""
        freed = False
        try:
            result = self.run_claimed(req, attempt)
            freed = isinstance(result, Finished)
            return result
        finally:
            if not freed:
                self.release_slot(req)
            self.pool.replenish()

    def throttle(self, req: RunRequest, record: InvocationRecord, grant: Grant) -> Later:
        """The run waits as `throttled`. Over its share for the first time, it goes to the
        back of the queue at once, behind the waiting run of another plugin; otherwise
        it comes back after a backoff."""
        countdown = (0.0 if grant is Grant.SHARE and record.waits == 0 else
                     run_retry(self.settings.throttle_backoff_max).delay(record.waits))
        why = (f"waiting for a concurrency slot ({req.concurrency})"
               if grant is Grant.CONCURRENCY else
               "waiting: the plugin holds its fair share of worker slots while other "
               "plugins wait")
        self.records.transition(req.invocation_id, Status.THROTTLED, increment="waits",
                                deadline=time.time() + countdown + RUNNING_GRACE_S, reason=why)
        metrics.THROTTLED.labels(plugin=req.plugin, reason=grant.value).inc()
        return Later(req, countdown)

    def release_slot(self, req: RunRequest) -> None:
        try:
            self.slots.release(req.plugin, req.invocation_id)
        except redis.RedisError as exc:  # the lease expires by itself
            log.warning("could not release %s's slot: %s", req.invocation_id, exc)

    def run_claimed(self, req: RunRequest, attempt: int) -> Finished | Later:
        try:
            code_dir = self.cache.code_dir(req.digest)
        except BundleError as exc:
            return self.conclude(req, Status.REJECTED, f"plugin content unusable: {exc.message}")
        try:
            result = self.execution.run(req, code_dir)
        except SandboxUnavailable as exc:
            return self.engine_unavailable(req, attempt, exc)
        if isinstance(result, Refused):
            return self.conclude(req, result.status, result.reason)
        metrics.CONTAINER_START.observe(result.container_start_s)
        metrics.DURATION.labels(plugin=req.plugin).observe(result.duration_s)
        if result.status in RETRYABLE and attempt <= req.retries:
            return self.again(req, attempt, RetryReason.MANIFEST,
                              f"{result.status.value}: {result.reason}",
                              exit_code=result.exit_code)
        decided = decide(req, result, self.settings)
        self.outcomes.store(req, decided)
        return Finished(decided.status, decided.reason)

    def engine_unavailable(self, req: RunRequest, attempt: int,
                           exc: SandboxUnavailable) -> Finished | Later:
        reason = f"sandbox_unavailable: {exc.message}"
        if attempt > self.settings.sandbox_retries:
            return self.conclude(req, Status.FAILED, reason)
        return self.again(req, attempt, RetryReason.SANDBOX_UNAVAILABLE, reason)

    def again(self, req: RunRequest, attempt: int, why: RetryReason, reason: str,
              **changes: object) -> Later:
        """This attempt is over and another one follows (status retrying)."""
        countdown = run_retry(self.settings.retry_backoff_max).delay(attempt - 1)
        metrics.RETRIES.labels(plugin=req.plugin, reason=why).inc()
        persist(lambda: self.records.transition(
            req.invocation_id, Status.RETRYING, reason=reason,
            deadline=time.time() + countdown + RUNNING_GRACE_S, **changes),
            self.settings.finish_budget_s, req.invocation_id)
        return Later(req.next_attempt(), countdown)

    def conclude(self, req: RunRequest, status: Status, reason: str) -> Finished:
        """A terminal outcome decided without a container run (rejected, unusable, spent)."""
        self.outcomes.store(req, without_run(status, reason))
        return Finished(status, reason)
