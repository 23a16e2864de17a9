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


class EngineProbe:
    """What the beat says of its engine and host: whether the engine answers (and why
    not), its images and runtimes (for reload's checks, every IMAGES_S), and who else
    holds the gVisor Sentries' uid (every NEIGHBOURS_EVERY beats)."""

    def __init__(self, engine: Engine, gvisor_runtime: str) -> None:
        self.engine = engine
        self.gvisor_runtime = gvisor_runtime
        self.ok = False
        self.error: str | None = None
        self.view = EngineView()
        self.neighbours: tuple[str, ...] = ()

    def probe(self, beat: int) -> None:
        try:
            self.engine.ping()
            self.ok, self.error = True, None
        except SandboxUnavailable as exc:
            self.ok, self.error = False, exc.message[:300]
        if self.ok and time.monotonic() - self.view.at > IMAGES_S:
            try:
                self.view = EngineView(time.monotonic(), tuple(self.engine.images()[:1000]),
                                       self.engine.runtimes())
            except Exception as exc:
                log.warning("cannot list images and runtimes: %s", exc)
        if beat % NEIGHBOURS_EVERY == 1:
            self.neighbours = tuple(sentries.neighbours(
                self.view.runtimes.get(self.gvisor_runtime)))


class Reaper:
    """Self-healing: what no run of this worker holds goes, at start (what killed workers
    left: containers and per-run directories) and at every beat (what an engine restart
    left behind)."""

    def __init__(self, wiring: Wiring, engine: Engine) -> None:
        self.wiring = wiring
        self.engine = engine

    def at_start(self) -> None:
        try:
            reaped = self.engine.reap()
            if reaped:
                log.warning("reaped %d orphaned container(s): %s", len(reaped),
                            ", ".join(reaped))
        except Exception as exc:
            log.warning("could not reap orphaned containers: %s", exc)
        settings = self.wiring.settings
        cutoff = time.time() - max(RUN_DIR_MAX_AGE_S, settings.max_timeout * 2)
        for path in glob.glob(str(settings.cache_dir / "runs" / "*")):
            with contextlib.suppress(OSError):
                if os.lstat(path).st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)

    def every_beat(self) -> None:
        # Containers are listed before their runs' holds are read: a container created
        # after the listing belongs to a run claimed before it, so it is never waste.
        reaped = self.engine.reap(child_pids(), self.wiring.slots.held)
        if reaped:
            log.warning("reaped %d container(s) no run uses: %s", len(reaped),
                        ", ".join(reaped))
        strays = self.engine.reap_strays()
        if strays:
            log.warning("reaped %d container(s) of worker containers that are gone: %s",
                        len(strays), ", ".join(strays))


class Heartbeat(threading.Thread):
    """The beat, every INTERVAL_S: the host's housekeeping now and then (the cache kept
    under its size, run uids of killed workers taken back), the engine probed, what no
    run holds reaped, and the worker's record (WorkerBeat) and slots reported."""

    def __init__(self, wiring: Wiring, name: str, engine: Engine, slots: int) -> None:
        super().__init__(name="titan-heartbeat", daemon=True)
        self.wiring = wiring
        self.engine = engine
        self.name_ = name
        self.slots = slots
        self.stopping = threading.Event()
        self.beats = 0  # the one count: eviction and the neighbours' scan go by it
        self.probe = EngineProbe(engine, wiring.settings.gvisor_runtime)
        self.reaper = Reaper(wiring, engine)
        self.janitor = CacheJanitor(wiring.settings.cache)

    def beat(self) -> None:
        if self.beats % EVICT_EVERY == 0:
            self.housekeeping()
        self.probe.probe(self.beats)
        if self.probe.ok:
            self.reaper.every_beat()
        self.report()

    def housekeeping(self) -> None:
        self.janitor.evict()
        taken_back = self.engine.identities.reclaim()
        if taken_back:
            log.warning("took back %d run uid(s) of killed workers: %s", len(taken_back),
                        ", ".join(map(str, taken_back)))

    def report(self) -> None:
        probe = self.probe
        WorkerBeat(self.name_, os.getpid(), probe.ok, probe.error, probe.view.images,
                   self.slots, tuple(sorted(probe.view.runtimes)),
                   tuple(self.engine.identities.ids.overlaps()[:10]), probe.neighbours,
                   self.engine.pooled if probe.ok else {},
                   ).save(self.wiring.conn, self.wiring.keys)
        self.wiring.slots.renew(self.name_, self.slots)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.beats += 1
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat: Redis unavailable: %s",
                            describe(exc, self.wiring.settings.redis))
            except Exception:
                log.exception("heartbeat failed")
            self.stopping.wait(INTERVAL_S)

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(redis.RedisError):
            WorkerBeat(self.name_, os.getpid(), False).remove(self.wiring.conn,
                                                              self.wiring.keys)


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
        self.heartbeat = Heartbeat(Wiring.connect(settings), worker.hostname,
                                   Engine(settings.engine),
                                   int(worker.concurrency or os.cpu_count() or 1))
        self.heartbeat.reaper.at_start()
        self.heartbeat.start()
        self.resender = Resender(Wiring.connect(settings), worker.app)
        self.resender.start()

    def stop(self, worker: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.resender is not None:
            self.resender.stop()
