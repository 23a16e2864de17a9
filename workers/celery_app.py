"""The worker's Celery app and per-process state (one Redis and one Docker client each).

Run with: celery -A workers.celery_app worker -Q titan.plugins
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import redis
from celery import signals

from manager.config import Settings
from manager.dispatch import make_celery
from manager.errors import SandboxUnavailable
from workers.heartbeat import Heartbeat
from workers.runner import Runner
from workers.sandbox import Sandbox

log = logging.getLogger(__name__)

app = make_celery(Settings.from_env(), "titan-worker")
app.conf.include = ["workers.tasks"]


@dataclass
class _ProcessState:
    pid: int
    runner: Runner


_state: _ProcessState | None = None


def runner() -> Runner:
    """This process's Runner, built on first use (after fork, never at import)."""
    global _state
    if _state is None or _state.pid != os.getpid():
        settings = Settings.from_env()
        conn = redis.Redis.from_url(settings.redis_url, health_check_interval=30,
                                    socket_keepalive=True)
        _state = _ProcessState(os.getpid(), Runner(conn, settings, Sandbox(settings)))
    return _state.runner


@signals.worker_process_init.connect
def _init_process(**_: object) -> None:
    try:
        runner().sandbox.client  # noqa: B018 - connect now rather than on the first run
    except SandboxUnavailable as exc:  # the engine may come back; tasks retry until then
        log.warning("worker process starts without a Docker engine: %s", exc)


_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _on_ready(sender: object = None, **_: object) -> None:
    """Starts the heartbeat, then reaps what a killed worker on this host left behind."""
    global _heartbeat
    settings = Settings.from_env()
    name = getattr(sender, "hostname", None) or f"{settings.worker_name}-{os.getpid()}"
    _heartbeat = Heartbeat(redis.Redis.from_url(settings.redis_url), settings, name)
    _heartbeat.start()
    try:
        reaped = Sandbox(settings).reap_orphans()
        if reaped:
            log.warning("reaped %d orphaned container(s): %s", len(reaped), ", ".join(reaped))
    except Exception as exc:
        log.warning("could not reap orphaned containers: %s", exc)


@signals.worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
