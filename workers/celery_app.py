"""The worker's Celery app and per-process state (one Redis and one Docker client each).

Run with: celery -A workers.celery_app worker -Q titan.plugins

Nothing is connected or read at import: the settings are read once per process, on first
use, and the Celery configuration derived from them is evaluated lazily.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from celery import Celery, signals

from manager.core.clients import redis_client
from manager.core.config import current
from manager.core.contract import celery_settings
from manager.core.errors import SandboxUnavailable, TitanError
from workers.heartbeat import Heartbeat
from workers.identity import RunIds
from workers.runner import Runner
from workers.sandbox import Sandbox

log = logging.getLogger(__name__)

app = Celery("titan-worker", include=["workers.tasks"])
app.config_from_object("celeryconfig")
app.add_defaults(lambda: celery_settings(current()))


@dataclass
class _ProcessState:
    pid: int
    runner: Runner


_state: _ProcessState | None = None
_heartbeat: Heartbeat | None = None


def runner() -> Runner:
    """This process's Runner, built on first use (after fork, never at import)."""
    global _state
    if _state is None or _state.pid != os.getpid():
        settings = current()
        _state = _ProcessState(os.getpid(),
                               Runner(redis_client(settings), settings, Sandbox(settings)))
    return _state.runner


@signals.worker_process_init.connect
def _init_process(**_: object) -> None:
    try:
        runner().sandbox.client  # noqa: B018 - connect now rather than on the first run
    except SandboxUnavailable as exc:  # the engine may come back; tasks retry until then
        log.warning("worker process starts without a Docker engine: %s", exc)


@signals.worker_process_shutdown.connect
def _process_shutdown(**_: object) -> None:
    """A stopping pool process removes its prewarmed containers."""
    if _state is not None and _state.pid == os.getpid():
        _state.runner.pool.close()


def pool_size(consumer: object) -> int:
    """How many runs this worker executes at once (its pool's processes)."""
    controller = getattr(consumer, "controller", None)
    size = getattr(controller, "concurrency", None) or app.conf.worker_concurrency
    return int(size or os.cpu_count() or 1)


@signals.worker_ready.connect
def _on_ready(sender: object = None, **_: object) -> None:
    """Starts the heartbeat, which also reaps what this host's dead workers left behind
    and, on every beat, what this worker's own processes no longer use."""
    global _heartbeat
    settings = current()
    try:  # every run's host identity must be one nobody else has
        RunIds.parse(settings.run_ids).check_host(Path(settings.host_etc))
    except TitanError as exc:
        log.critical("%s", exc.message)
        raise SystemExit(1) from None
    name = getattr(sender, "hostname", None) or f"{settings.worker_name}-{os.getpid()}"
    _heartbeat = Heartbeat(redis_client(settings), settings, name, Sandbox(settings),
                           pool_size(sender))
    _heartbeat.reap_at_start()
    _heartbeat.start()


@signals.worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
