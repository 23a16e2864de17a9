"""One delivery of a run's task message, through the steps of a run in their order:
claim (workers.claim) -> the attempt (workers.attempt: prepare, what the run is given,
execute, classify) -> finish (workers.finish), or again. Every record
change goes through the record store's transitions; what the task does next is the
delivery's answer (workers.next): Done, or Again in a while."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import redis

from manager.core.errors import NotReplicated, SandboxUnavailable
from manager.core.later import Later
from manager.core.observer import observer
from manager.core.records import Outcome, Status
from manager.core.retry import run_retry
from manager.core.runs import RetryReason, RunRequest
from manager.core.secrets import SecretStore
from manager.core.wiring import Wiring
from manager.plugins.registry import Registry
from workers.attempt import Execute, Unavailable, attempt
from workers.claim import RUNNING_GRACE_S, Keeper, claim
from workers.engine import Engine
from workers.execute import run_container
from workers.finish import finish, persist
from workers.given import Gate
from workers.next import Again, Done, Next
from workers.plugin_cache import PluginCache
from workers.pool import WarmPool

log = logging.getLogger(__name__)
RETRYABLE = {Status.FAILED, Status.TIMEOUT, Status.OOM}  # only with `retries:` in the manifest
ENGINE_RECHECK_MAX_S = 5  # an engine away is tried again at most this far apart
REPLICATION_RECHECK_S = 5  # a stored outcome no replica confirmed yet is looked at again


class Delivery:
    """Per worker process (built on its first run, after the fork): the engine, the local
    caches, the prewarm pool, and the keeper of the holds of the runs it executes."""

    def __init__(self, wiring: Wiring, engine: Engine,
                 container_step: Execute = run_container) -> None:
        self.wiring = wiring
        self.settings = wiring.settings
        self.engine = engine
        self.run_container = container_step  # launch and run loop (tests play back ends)
        registry = Registry(wiring)
        self.cache = PluginCache(registry, self.settings.cache)
        self.pool = WarmPool(self.settings.prewarm, engine, lambda: {
            e.digest for e in registry.entries().values() if e.digest})
        self.keeper = Keeper(wiring.slots)
        self.later = Later(wiring.conn, wiring.keys)  # where Again's runs wait (tasks.py)
        self.gate = Gate(self.settings.egress, engine,
                         SecretStore(wiring.conn, wiring.keys, self.settings.secrets_key))

    def start(self) -> None:
        """The pool process starts: its engine is connected (or found away: runs wait for
        it), and the threads it runs beside the runs start now, not on a first run: the
        keeper of holds, the prewarm pool's maintenance, the OOM watch."""
        try:
            self.engine.client  # noqa: B018 (connects)
        except SandboxUnavailable as exc:  # the engine may come back; runs wait for it
            log.warning("worker process starts without a Docker engine: %s", exc)
        self.keeper.start()
        self.pool.start()
        self.engine.oom.start()

    def deliver(self, req: RunRequest, worker: str) -> Next:
        """Claims the run and, with its slot, runs it to its stored outcome; or says why it
        waits (throttled, held by a live process, the engine unusable, the manifest's
        retries) or ran nothing. An outcome no replica confirmed yet is confirmed later
        (its message is acknowledged only then), without holding a slot."""
        try:
            claimed = claim(self.wiring, req, worker)
            if not isinstance(claimed, int):
                return claimed
            with self.keeper.holding(req, worker):
                return self.run(req, claimed)
        except NotReplicated as exc:
            log.warning("invocation %s: %s; confirming again in %ss", req.invocation_id,
                        exc.message, REPLICATION_RECHECK_S)
            return Again(req, REPLICATION_RECHECK_S)

    def run(self, req: RunRequest, attempt: int) -> Next:
        """The claimed attempt; its slot is freed with its stored outcome (Done), else
        here, with its hold (another attempt follows, or an error). Only then does the
        prewarm pool remove the used container and start its replacement: neither
        competes with the run's last steps for the CPU."""
        stored = False
        try:
            done = self.attempt(req, attempt)
            stored = isinstance(done, Done)
            return done
        finally:
            if not stored:
                self.let_go(req)
            self.pool.replenish()

    def attempt(self, req: RunRequest, attempt_no: int) -> Next:
        """The attempt's steps (workers.attempt), then what follows from its end: stored,
        or tried again (the engine away, or the manifest's retries)."""
        tried = attempt(req, self.settings, self.engine, self.cache, pool=self.pool,
                        gate=self.gate, execute=self.run_container)
        if isinstance(tried, Outcome):
            return self.finish(req, tried)
        if isinstance(tried, Unavailable):
            return self.unavailable(req, attempt_no, tried.why)
        end, judged = tried.end, tried.judged
        observer().ran(req.plugin, end.warm, req.isolation.value, end.ready_s, end.duration_s)
        if judged.status in RETRYABLE and attempt_no - req.engine_waits <= req.retries:
            return self.again(req, attempt_no, RetryReason.MANIFEST,
                              f"{judged.status.value}: {judged.reason}",
                              exit_code=end.exit_code)
        done = self.finish(req, tried.concluded(req, self.settings.output))
        if req.dispatched_at:  # (a message sent before the field existed has none)
            observer().answered(req.plugin, end.warm, req.isolation.value,
                                time.time() - req.dispatched_at)
        return done

    def finish(self, req: RunRequest, ended: Outcome) -> Done:
        """The run's end, stored (workers.finish): the one way a run ends."""
        finish(self.wiring, req, ended)
        return Done.of(ended)

    def unavailable(self, req: RunRequest, attempt: int, why: str) -> Next:
        """The engine is away: waited out, not counted. The run is tried again (at most
        ENGINE_RECHECK_MAX_S apart) until the engine has been away for
        `sandbox_patience_s` since this run first found it so; only then does it fail."""
        now = self.wiring.records.now()
        since = req.engine_away_since or now
        reason = f"sandbox_unavailable: {why}"
        if now - since >= self.settings.sandbox_patience_s:
            return self.finish(req, Outcome(Status.FAILED, f"{reason} (away for "
                                            f"{now - since:.0f} s, TITAN_SANDBOX_PATIENCE_S)"))
        waited = replace(req, engine_away_since=since, engine_waits=req.engine_waits + 1)
        return self.again(waited, req.engine_waits + 1, RetryReason.SANDBOX_UNAVAILABLE,
                          reason, cap=ENGINE_RECHECK_MAX_S)

    def again(self, req: RunRequest, attempt: int, why: RetryReason, reason: str,
              cap: float | None = None, **changes: object) -> Again:
        """This attempt is over and another one follows (status retrying), the `attempt`th
        wait backed off up to `cap` (default: `retry_backoff_max`)."""
        limit = self.settings.retry_backoff_max if cap is None else min(
            cap, self.settings.retry_backoff_max)
        countdown = run_retry(limit).delay(attempt - 1)
        observer().retried(req.plugin, why)
        persist(lambda: self.wiring.records.transition(
            req.invocation_id, Status.RETRYING, reason=reason, note=reason,
            due_in=countdown + RUNNING_GRACE_S, **changes),
            self.settings.finish_budget_s, req.invocation_id)
        return Again(req.next_attempt(), countdown)

    def let_go(self, req: RunRequest) -> None:
        try:
            self.wiring.slots.let_go(req.plugin, req.invocation_id)
        except redis.RedisError as exc:  # the hold and the slot expire by themselves
            log.warning("could not let go of %s's slot and hold: %s", req.invocation_id, exc)

    def close(self) -> None:
        """This pool process stops: its prewarmed containers go, its keeper stops."""
        self.pool.close()
        self.keeper.stop()
