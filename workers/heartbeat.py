"""Worker heartbeat, in the worker's main process: liveness, the Docker engine's state and
the runs this worker holds (for /health, for a second delivery's takeover decision and
for the sweeper), and self-healing: every beat it removes this worker's containers that
no run of its processes is using, so what an engine restart left behind is gone within
one interval, without restarting the worker."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import threading
import time

import psutil
import redis
from celery.worker import state as worker_state

from manager.core.beats import WorkerBeat
from manager.core.config import Settings
from manager.core.errors import SandboxUnavailable
from manager.core.keys import Keys
from manager.plugins.janitor import CacheJanitor
from workers.sandbox import Sandbox

log = logging.getLogger(__name__)
INTERVAL_S = 3.0
RUN_DIR_MAX_AGE_S = 3600
IMAGES_S = 30.0
EVICT_EVERY = 20  # beats: the cache is checked about once a minute


def held_runs() -> set[str]:
    """Invocation ids this worker has accepted (active) or prefetched (reserved)."""
    for _ in range(5):
        try:
            return {r.id for r in (*worker_state.active_requests,
                                   *worker_state.reserved_requests)}
        except RuntimeError:  # the sets changed while being read
            continue
    return set()


def active_plugins() -> dict[str, str]:
    """Invocation id -> plugin, for the runs this worker is executing (whose worker slot
    leases its beat renews)."""
    for _ in range(5):
        try:
            return {r.id: str(((r.kwargs or {}).get("request") or {}).get("plugin", ""))
                    for r in list(worker_state.active_requests)}
        except RuntimeError:  # the set changed while being read
            continue
    return {}


def child_pids() -> set[int]:
    """This process's children (the worker's pool processes)."""
    return {child.pid for child in psutil.Process().children()}


class Heartbeat(threading.Thread):
    def __init__(self, conn: redis.Redis, settings: Settings, name: str,
                 sandbox: Sandbox, slots: int) -> None:
        super().__init__(name="titan-heartbeat", daemon=True)
        self.conn = conn
        self.settings = settings
        self.sandbox = sandbox
        self.keys = Keys(settings.key_prefix)
        self.name_ = name
        self.slots = slots
        self.stopping = threading.Event()
        self._docker_ok = False
        self._docker_error: str | None = None
        self._images: tuple[float, list[str], set[str]] = (0.0, [], set())
        self.janitor = CacheJanitor(settings)

    def docker_state(self) -> None:
        try:
            self.sandbox.ping()
            self._docker_ok, self._docker_error = True, None
        except SandboxUnavailable as exc:
            self._docker_ok, self._docker_error = False, exc.message[:300]

    def beat(self) -> None:
        self.docker_state()
        # Containers are listed before the held runs are read: a container created after
        # the snapshot belongs to a run accepted before it, so it is never taken for waste.
        if self._docker_ok:
            reaped = self.sandbox.reap(child_pids(), held_runs)
            if reaped:
                log.warning("reaped %d container(s) no run uses: %s", len(reaped),
                            ", ".join(reaped))
        WorkerBeat(self.name_, os.getpid(), self._docker_ok, self._docker_error,
                   tuple(sorted(held_runs())), tuple(self.images()), self.slots,
                   tuple(sorted(self._images[2]))).save(self.conn, self.keys,
                                                        active=active_plugins())

    def images(self) -> list[str]:
        """The engine's images and runtimes (for reload's checks), refreshed every
        IMAGES_S; returns the images."""
        if self._docker_ok and time.monotonic() - self._images[0] > IMAGES_S:
            try:
                self._images = (time.monotonic(), self.sandbox.images()[:1000],
                                self.sandbox.runtimes())
            except Exception as exc:
                log.warning("cannot list images and runtimes: %s", exc)
        return self._images[1]

    def reap_at_start(self) -> None:
        """What killed workers on this host left: containers and per-run directories."""
        try:
            reaped = self.sandbox.reap()
            if reaped:
                log.warning("reaped %d orphaned container(s): %s", len(reaped),
                            ", ".join(reaped))
        except Exception as exc:
            log.warning("could not reap orphaned containers: %s", exc)
        cutoff = time.time() - max(RUN_DIR_MAX_AGE_S, self.settings.max_timeout * 2)
        for path in glob.glob(str(self.settings.cache_dir / "runs" / "*")):
            with contextlib.suppress(OSError):
                if os.lstat(path).st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)

    def run(self) -> None:
        beats = 0
        while not self.stopping.is_set():
            beats += 1
            try:
                if beats % EVICT_EVERY == 0:
                    self.janitor.evict()
                    taken_back = self.sandbox.identities.reclaim()
                    if taken_back:
                        log.warning("took back %d run uid(s) of killed workers: %s",
                                    len(taken_back), ", ".join(map(str, taken_back)))
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat: Redis unavailable: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            self.stopping.wait(INTERVAL_S)

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(redis.RedisError):
            WorkerBeat(self.name_, os.getpid(), False).remove(self.conn, self.keys)
