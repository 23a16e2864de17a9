"""Every Redis key of the project's own, built in one place. The bus streams and the task
queue are settings (producers and Celery name them too); kombu's bookkeeping keys are
named here and handed to kombu through the Celery contract (manager.core.contract)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key builder bound to a prefix, so tests can run beside a user's data."""

    prefix: str = "titan"

    @property
    def registry(self) -> str:
        """Hash: plugin name -> JSON of its registry entry."""
        return f"{self.prefix}:registry"

    @property
    def registry_version(self) -> str:
        """Counter bumped on every registry change; readers reload when it moves."""
        return f"{self.prefix}:registry:version"

    def bundle(self, digest: str) -> str:
        """String: the tar.gz of a plugin directory, by content digest."""
        return f"{self.prefix}:bundle:{digest}"

    def invocation(self, invocation_id: str) -> str:
        """Hash: one invocation record, each field's value as JSON."""
        return f"{self.prefix}:inv:{invocation_id}"

    @property
    def invocations(self) -> str:
        """Sorted set: every plugin's invocation ids, scored by creation time (capped)."""
        return f"{self.prefix}:invocations"

    def plugin_invocations(self, plugin: str) -> str:
        """Sorted set: invocation ids of a plugin, scored by creation time."""
        return f"{self.prefix}:plugin:{plugin}:invocations"

    def plugin_versions(self, plugin: str) -> str:
        """List: the kept versions of a plugin (registry entries as JSON), newest first."""
        return f"{self.prefix}:plugin:{plugin}:versions"

    @property
    def versions_pattern(self) -> str:
        """Every plugin's kept versions (for the bundle collector)."""
        return self.plugin_versions("*")

    def plugin_slots(self, plugin: str) -> str:
        """Sorted set: invocations holding one of a plugin's concurrency slots."""
        return f"{self.prefix}:plugin:{plugin}:slots"

    def dispatched(self, event_id: str, plugin: str) -> str:
        """String: the invocation id an (event, plugin) pair was dispatched as."""
        return f"{self.prefix}:dispatched:{event_id}:{plugin}"

    @property
    def secrets(self) -> str:
        """Hash: secret name -> JSON of its size, plugins, time and encrypted value."""
        return f"{self.prefix}:secrets"

    @property
    def inflight(self) -> str:
        """Sorted set: non-terminal invocations by the deadline the sweeper checks."""
        return f"{self.prefix}:inflight"

    @property
    def waiting(self) -> str:
        """Hash: plugin -> its runs waiting in the queue (status queued), kept exact by the
        record scripts."""
        return f"{self.prefix}:waiting"

    def plugin_line(self, plugin: str) -> str:
        """Sorted set: a plugin's runs sent and not yet running, by creation time (its
        queue depth and oldest waiting run; lib.lua's line_of spells the same name)."""
        return f"{self.waiting}:{plugin}"

    @property
    def worker_slots(self) -> str:
        """Hash: worker name -> "slots beat-time", written with each beat (the fair share's
        total is summed in Lua from the entries younger than a beat's TTL)."""
        return f"{self.prefix}:worker-slots"

    @property
    def replication_probe(self) -> str:
        """String: written before a WAIT, so the WAIT covers the writer's earlier writes."""
        return f"{self.prefix}:replication-probe"

    @property
    def timer_fired(self) -> str:
        """Hash: `plugin:timer key` -> the scheduled time (epoch s) of its last tick, fired
        or skipped (manager/core/lua/tick.lua writes it with the tick's event)."""
        return f"{self.prefix}:timers:fired"

    @property
    def timer_since(self) -> str:
        """Hash: `plugin:timer key` -> when the registry put that timer in service; ticks
        scheduled before it are never fired (a new or restored schedule starts next)."""
        return f"{self.prefix}:timers:since"

    @property
    def sweep_lock(self) -> str:
        """String: held by the one process sweeping abandoned runs."""
        return f"{self.prefix}:sweep:lock"

    @property
    def sweep_suspects(self) -> str:
        """Hash: invocation id -> when the sweeper first found it abandoned."""
        return f"{self.prefix}:sweep:suspects"

    def entry_outcome(self, entry_id: str) -> str:
        """Hash (short TTL): what the listener did with one stream entry, for `publish
        --wait`: plugin -> {"invocation_id", "duplicate"}, `_dead` -> the reason it was
        dead-lettered, `_done` once it was handled. An entry that matched nothing has
        none: the consumer group says it was handled (manager.bus.group)."""
        return f"{self.prefix}:entry:{entry_id}"

    def budget(self, correlation_id: str) -> str:
        """Counter: runs dispatched for one correlation id (the fan-out budget)."""
        return f"{self.prefix}:budget:{correlation_id}"

    def budget_charged(self, entry_id: str) -> str:
        """String: what the budget counter read when this stream entry was charged (so a
        redelivered entry is never charged twice)."""
        return f"{self.prefix}:budget-charged:{entry_id}"

    def worker_heartbeat(self, worker: str) -> str:
        """String (with a TTL): one worker's last beat (manager.core.beats.WorkerBeat)."""
        return f"{self.prefix}:worker:{worker}"

    def lease(self, invocation_id: str) -> str:
        """String (with a TTL): the worker holding a message of this run (accepted,
        prefetched or scheduled), renewed on each of its beats (arq's `in-progress:`)."""
        return f"{self.prefix}:lease:{invocation_id}"

    @property
    def later(self) -> str:
        """Sorted set: runs to be sent again (a retry's or a throttle's backoff), scored by
        when, on Redis's clock (manager.core.later)."""
        return f"{self.prefix}:later"

    @property
    def later_requests(self) -> str:
        """Hash: each of those runs' request (JSON), by invocation id."""
        return f"{self.prefix}:later:requests"

    @property
    def unacked(self) -> str:
        """Hash (kombu's, under our prefix through its `unacked_key` transport option):
        delivered task messages not yet acknowledged, restored after the visibility
        timeout. Two instances on one Redis never see each other's. Only kombu reads it."""
        return f"{self.prefix}:unacked"

    @property
    def unacked_index(self) -> str:
        return f"{self.prefix}:unacked_index"

    @property
    def unacked_mutex(self) -> str:
        return f"{self.prefix}:unacked_mutex"

    @property
    def workers(self) -> str:
        """Set: the names of workers that have beaten (expired ones pruned when listed)."""
        return f"{self.prefix}:workers"

    def minute_stats(self, minute: int) -> str:
        """Hash: runs ended in one minute (epoch s // 60): ended, failed, warm, cold."""
        return f"{self.prefix}:stats:{minute}"

    def console_session(self, digest: str) -> str:
        """String: a console session (JSON), by the SHA-256 of its cookie's token."""
        return f"{self.prefix}:console:{digest}"

    def console_messages(self, digest: str) -> str:
        """List: a console session's messages for its next page (each shown once)."""
        return f"{self.prefix}:console:{digest}:told"
