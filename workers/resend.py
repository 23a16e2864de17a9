"""The worker's resender: runs whose time to be sent again has come (a retry's or a
throttle's backoff, kept in Redis on Redis's clock: manager.core.later) go out as new
task messages. Every worker runs one; each run is taken by one of them."""

from __future__ import annotations

import logging
import threading

import redis
from celery import Celery

from manager.core.config import Settings
from manager.core.contract import send_run
from manager.core.later import Later
from manager.core.wiring import Wiring

log = logging.getLogger(__name__)
RESEND_S = 0.2  # how often due runs are looked for: a backoff is kept to about this


class Resender(threading.Thread):
    def __init__(self, wiring: Wiring, celery: Celery) -> None:
        super().__init__(name="titan-resend", daemon=True)
        self.settings: Settings = wiring.settings
        self.later = Later(wiring.conn, wiring.keys)
        self.celery = celery
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(RESEND_S):
            try:
                self.resend()
            except (redis.RedisError, OSError) as exc:  # sent at the next look, or swept
                log.warning("resender: %s", exc)
            except Exception:
                log.exception("resender failed")

    def resend(self) -> int:
        due = self.later.due()
        for request, priority, queue in due:
            send_run(self.celery, self.settings.broker, request, priority, queue)
        return len(due)

    def stop(self) -> None:
        self.stopping.set()
