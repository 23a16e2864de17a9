"""The pool of prewarmed containers of one worker process (SPEC §4): per configuration
(plugin digest, image, limits, mounts: a PoolConfig) a few containers started ahead,
waiting in the product's launcher (workers.warm). Each serves exactly one run and is
then removed: never reused, so no state leaks between runs. A run takes a ready
container; a maintenance thread prewarms, expires idle containers, drains
configurations no longer current, and removes used ones off the critical path.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import requests
from docker.errors import DockerException

from manager.core.errors import SandboxUnavailable
from manager.core.groups import PrewarmSettings
from manager.core.observer import observer
from workers.container import ContainerHandle
from workers.engine import Engine
from workers.options import LABEL_PID, LABEL_POOL, LABEL_UID
from workers.run_spec import PoolConfig, RunSpec
from workers.warm import READY_TIMEOUT_S, PrewarmStopped, Warm, WarmUnavailable, prewarm

log = logging.getLogger(__name__)
PREWARM_WAIT_S = 0.5  # a run waits this long for a prewarm already under way
MAINTAIN_S = 2.0  # the maintenance thread's tick (it also wakes after each run)
# how often the registry is asked which versions are current: once a tick, not once a run
# (the thread wakes after every run; a warm run's budget has no room for the round trip)
REGISTRY_CHECK_S = MAINTAIN_S


class WarmPool:
    """Per worker process. `take` is called by the run; a maintenance thread prewarms,
    expires idle containers, drains configurations no longer current, and removes used
    ones."""

    def __init__(self, settings: PrewarmSettings, engine: Engine,
                 current_digests: Callable[[], set[str]] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.current_digests = current_digests
        self.idle: dict[PoolConfig, list[Warm]] = {}
        self.wanted: dict[PoolConfig, float] = {}  # configurations in use, and when
        self.unwarmable: set[str] = set()
        self.to_remove: list[Any] = []
        self.busy: set[str] = set()  # ids of containers serving a run right now
        self.warming: dict[PoolConfig, threading.Event] = {}  # prewarms in progress
        self.ticks = 0
        self.registry_checked = 0.0  # monotonic time of the last registry check
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def take(self, spec: RunSpec) -> Warm | None:
        """A ready container for this configuration, or None (the run goes cold)."""
        if not self.enabled or spec.image in self.unwarmable:
            return None
        key = spec.config
        with self.lock:
            self.wanted[key] = time.monotonic()
            in_progress = self.warming.get(key)
        warm = self._pop(key)
        if warm is None and in_progress is not None:
            # One is being started already: cheaper and sooner than a second, cold one.
            in_progress.wait(PREWARM_WAIT_S)
            warm = self._pop(key)
        if warm is not None and (clash := self.engine.identities.ids.conflict(warm.user.uid)):
            log.warning("prewarmed container %s: its uid %d is the host's now (%s); removed",
                        warm.container.id[:12], warm.user.uid, clash)
            self.done(warm)
            warm = None
        observer().prewarm_taken(spec.plugin, warm is not None)
        self.start()
        if warm is None:
            self.wake.set()  # a first one; a replacement starts when this run is done
        return warm

    def _pop(self, key: PoolConfig) -> Warm | None:
        with self.lock:
            ready = self.idle.get(key) or []
            warm = ready.pop(0) if ready else None
            if warm:
                self.busy.add(warm.container.id)
        return warm

    def done(self, warm: Warm) -> None:
        """Single use: the container goes, whatever the outcome, and a replacement is
        started, by the maintenance thread once the run's outcome is stored (replenish),
        or at its next tick."""
        with self.lock:
            self.busy.discard(warm.container.id)
            self.to_remove.append(warm)

    def replenish(self) -> None:
        """The run is over, its outcome stored: used containers go, replacements start."""
        if self.enabled:
            self.wake.set()

    def close(self) -> None:
        """Removes every container of this pool (worker process shutdown)."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(READY_TIMEOUT_S + 30)  # a prewarm in progress finishes first
        with self.lock:
            doomed = [w for ws in self.idle.values() for w in ws] + self.to_remove
            self.idle, self.to_remove = {}, []
        for warm in doomed:
            self._discard(warm)

    def start(self) -> None:
        """Its maintenance thread runs (again, should it have died); none when prewarming
        is off."""
        if self.enabled and (self.thread is None or not self.thread.is_alive()):
            self.thread = threading.Thread(target=self._loop, name="titan-prewarm", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._maintain()
            except Exception:
                log.exception("prewarm pool maintenance failed")
            self.wake.wait(MAINTAIN_S)
            self.wake.clear()

    def _maintain(self) -> None:
        self._expire()
        self.ticks += 1
        if self.ticks % 15 == 0:
            self._sweep_leftovers()
        # The configurations used most recently first: what is hot now gets a slot.
        for key in sorted(self.wanted, key=self.wanted.__getitem__, reverse=True):
            while not self.stopping.is_set() and self._short(key):
                if not self._make_room(key) or not self._prewarm(key):
                    break
        # Used containers go after their replacements are ready: removals ahead of them
        # (a stop and a teardown each) made the next run of a plugin find its pool empty
        # now and then and go cold (make bench: every warm p99 was such a run)
        with self.lock:
            removals, self.to_remove = self.to_remove, []
        for warm in removals:
            self._discard(warm)
        observer().prewarm_idle(sum(len(v) for v in self.idle.values()))

    def _short(self, key: PoolConfig) -> bool:
        with self.lock:
            return len(self.idle.get(key, [])) < self.settings.size

    def _make_room(self, key: PoolConfig) -> bool:
        """A slot for `key`: a free one, or else the one held by an idle container of the
        configuration used least recently, if that was used before `key` was (the pool
        gives way to what is used now, never to what was used once long ago)."""
        with self.lock:
            if sum(len(v) for v in self.idle.values()) < self.settings.max:
                return True
            used = self.wanted.get(key, 0.0)
            older = [k for k, ready in self.idle.items()
                     if ready and k != key and self.wanted.get(k, 0.0) < used]
            if not older:
                return False
            victim_key = min(older, key=lambda k: self.wanted.get(k, 0.0))
            victim = self.idle[victim_key].pop(0)
        observer().prewarm_evicted(victim_key.plugin)
        self._discard(victim)
        return True

    def _expire(self) -> None:
        """Idle past the TTL, or of a plugin version no longer in the registry."""
        now = time.monotonic()
        current = None
        if self.current_digests and now - self.registry_checked >= REGISTRY_CHECK_S:
            self.registry_checked = now
            try:
                current = self.current_digests()
            except redis.RedisError as exc:  # Redis away: nothing is drained this time
                log.warning("prewarm pool: cannot read the registry: %s", exc)
        stale = []
        with self.lock:
            for key, used in list(self.wanted.items()):
                gone = current is not None and key.digest not in current
                if gone or now - used > self.settings.idle_s:
                    del self.wanted[key]
                    stale += self.idle.pop(key, [])
            for key, ready in self.idle.items():
                keep = [w for w in ready if now - w.ready_mono <= self.settings.idle_s]
                stale += [w for w in ready if w not in keep]
                self.idle[key] = keep
        for warm in stale:
            self._discard(warm)

    def _prewarm(self, key: PoolConfig) -> bool:
        started = threading.Event()
        with self.lock:
            self.warming[key] = started
        try:
            return self._start(key)
        finally:
            with self.lock:
                self.warming.pop(key, None)
            started.set()

    def _start(self, key: PoolConfig) -> bool:
        try:
            warm = prewarm(self.engine, key)
        except WarmUnavailable as exc:
            log.warning("image %s cannot be prewarmed (%s): its runs stay cold", key.image, exc)
            self.unwarmable.add(key.image)
            return False
        except (DockerException, requests.RequestException, OSError, PrewarmStopped,
                SandboxUnavailable) as exc:  # the engine's moment, not the image's
            log.warning("prewarming %s failed: %s", key.plugin, exc)
            return False
        with self.lock:
            if not self.stopping.is_set():
                self.idle.setdefault(key, []).append(warm)
                log.info("prewarmed %s %s: ready", key.plugin, warm.container.id[:12])
                return True
        self._discard(warm)
        return False

    def _discard(self, warm: Warm) -> None:
        self.engine.oom.killed(warm.oom)  # its watch ends with it
        if warm.container.remove():
            self.engine.identities.give_back(warm.user)
            shutil.rmtree(warm.home, ignore_errors=True)
            if warm.secrets is not None:
                shutil.rmtree(warm.secrets, ignore_errors=True)
        elif not self.stopping.is_set():
            with self.lock:
                self.to_remove.append(warm)  # the engine may be away: again next time

    def _sweep_leftovers(self) -> None:
        """Any container of this process's pool that is neither ready nor serving a run
        (a removal lost while the engine was away) is removed."""
        with self.lock:
            known = self.busy | {w.container.id for ws in self.idle.values() for w in ws}
        try:
            mine = self.engine.mine({LABEL_POOL: "1", LABEL_PID: str(os.getpid())})
        except (DockerException, requests.RequestException):
            return
        for container in mine:
            if container.id not in known and ContainerHandle(self.engine.client,
                                                             container).remove():
                labels = container.attrs.get("Labels") or {}
                self.engine.identities.give_back_label(labels.get(LABEL_UID))
