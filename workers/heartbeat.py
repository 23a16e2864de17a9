"""The worker's heartbeat, in its main process: liveness, the Docker engine's state, its
slots (for the fair share), the images and runtimes its engine has (for reload's
checks), and self-healing: every beat it removes this worker's containers that no run of
its processes holds, so what an engine restart left behind is gone within one interval,
without restarting the worker. Started and stopped with the worker as a Celery bootstep
(HeartbeatStep), after the range of run ids is checked against the host's accounts."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import bootsteps

from manager.core.beats import WorkerBeat
from manager.core.clients import describe
from manager.core.errors import SandboxUnavailable
from manager.core.wiring import Wiring, process_settings
from manager.plugins.janitor import CacheJanitor
from workers import sentries
from workers.engine import Engine
from workers.identity import RunIds
from workers.resend import Resender

log = logging.getLogger(__name__)
INTERVAL_S = 3.0
RUN_DIR_MAX_AGE_S = 3600
IMAGES_S = 30.0
EVICT_EVERY = 20  # beats: the cache is checked about once a minute
NEIGHBOURS_EVERY = 3  # beats: the Sentries' uid is looked for about every 9 s


@dataclass(frozen=True)
class EngineView:
    """What the heartbeat last learnt of its engine and host (every IMAGES_S)."""

    at: float = 0.0
    images: tuple[str, ...] = ()
    runtimes: dict[str, str] = field(default_factory=dict)  # name: program


def child_pids() -> set[int]:
    """This process's children (the worker's pool processes)."""
    return {child.pid for child in psutil.Process().children()}


class Heartbeat(threading.Thread):
    def __init__(self, wiring: Wiring, name: str, engine: Engine, slots: int) -> None:
        super().__init__(name="titan-heartbeat", daemon=True)
        self.wiring = wiring
        self.conn = wiring.conn
        self.settings = wiring.settings
        self.engine = engine
        self.keys = wiring.keys
        self.name_ = name
        self.slots = slots
        self.stopping = threading.Event()
        self._docker_ok = False
        self._docker_error: str | None = None
        self.view = EngineView()
        self.beats = 0
        self.neighbours: tuple[str, ...] = ()  # workers.sentries, every NEIGHBOURS_EVERY
        self.janitor = CacheJanitor(self.settings)

    def docker_state(self) -> None:
        try:
            self.engine.ping()
            self._docker_ok, self._docker_error = True, None
        except SandboxUnavailable as exc:
            self._docker_ok, self._docker_error = False, exc.message[:300]

    def beat(self) -> None:
        self.docker_state()
        # Containers are listed before their runs' holds are read: a container created
        # after the listing belongs to a run claimed before it, so it is never waste.
        if self._docker_ok:
            reaped = self.engine.reap(child_pids(), self.wiring.slots.held)
            if reaped:
                log.warning("reaped %d container(s) no run uses: %s", len(reaped),
                            ", ".join(reaped))
            strays = self.engine.reap_strays()
            if strays:
                log.warning("reaped %d container(s) of worker containers that are gone: %s",
                            len(strays), ", ".join(strays))
        view = self.refreshed_view()
        if self.beats % NEIGHBOURS_EVERY == 1:  # who else holds the gVisor Sentries' uid
            self.neighbours = tuple(sentries.neighbours(
                view.runtimes.get(self.settings.gvisor_runtime)))
        WorkerBeat(self.name_, os.getpid(), self._docker_ok, self._docker_error,
                   view.images, self.slots, tuple(sorted(view.runtimes)),
                   tuple(self.engine.identities.ids.overlaps()[:10]),
                   self.neighbours, self.engine.pooled if self._docker_ok else {},
                   ).save(self.conn, self.keys)
        self.wiring.slots.renew(self.name_, self.slots)

    def refreshed_view(self) -> EngineView:
        """The engine's images and runtimes (for reload's checks), refreshed every
        IMAGES_S."""
        if self._docker_ok and time.monotonic() - self.view.at > IMAGES_S:
            try:
                runtimes = self.engine.runtimes()
                self.view = EngineView(time.monotonic(), tuple(self.engine.images()[:1000]),
                                       runtimes)
            except Exception as exc:
                log.warning("cannot list images and runtimes: %s", exc)
        return self.view

    def reap_at_start(self) -> None:
        """What killed workers on this host left: containers and per-run directories."""
        try:
            reaped = self.engine.reap()
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
        while not self.stopping.is_set():
            self.beats += 1  # the one count: eviction and the neighbours' scan go by it
            try:
                if self.beats % EVICT_EVERY == 0:
                    self.janitor.evict()
                    taken_back = self.engine.identities.reclaim()
                    if taken_back:
                        log.warning("took back %d run uid(s) of killed workers: %s",
                                    len(taken_back), ", ".join(map(str, taken_back)))
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat: Redis unavailable: %s", describe(exc, self.settings.redis))
            except Exception:
                log.exception("heartbeat failed")
            self.stopping.wait(INTERVAL_S)

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(redis.RedisError):
            WorkerBeat(self.name_, os.getpid(), False).remove(self.conn, self.keys)


class HeartbeatStep(bootsteps.StartStopStep):
    """The heartbeat and the resender (workers.resend) as a worker component (registered
    in workers.celery_app): started once the worker's pool is, stopped with the worker.
    A range of run ids that the host already uses is an unrecoverable error: the worker
    does not start."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.heartbeat: Heartbeat | None = None
        self.resender: Resender | None = None

    def start(self, worker: Any) -> None:
        settings = process_settings()
        RunIds.parse(settings.run_ids).check_host(Path(settings.host_etc))
        self.heartbeat = Heartbeat(Wiring.connect(settings), worker.hostname, Engine(settings),
                                   int(worker.concurrency or os.cpu_count() or 1))
        self.heartbeat.reap_at_start()
        self.heartbeat.start()
        self.resender = Resender(Wiring.connect(settings), worker.app)
        self.resender.start()

    def stop(self, worker: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.resender is not None:
            self.resender.stop()
