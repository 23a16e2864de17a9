"""Worker heartbeat: liveness and the Docker engine's state, for /health on any host."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

import redis

from manager.config import Settings
from manager.errors import SandboxUnavailable
from manager.keys import Keys
from workers.sandbox import connect_docker

log = logging.getLogger(__name__)
INTERVAL_S = 3.0
TTL_S = 10


class Heartbeat(threading.Thread):
    def __init__(self, conn: redis.Redis, settings: Settings, name: str) -> None:
        super().__init__(name="titan-heartbeat", daemon=True)
        self.conn = conn
        self.key = Keys(settings.key_prefix).worker_heartbeat(name)
        self.name_ = name
        self.stopping = threading.Event()
        self._docker = None

    def docker_state(self) -> dict[str, object]:
        try:
            if self._docker is None:
                self._docker = connect_docker()
            else:
                self._docker.ping()
            return {"ok": True}
        except SandboxUnavailable as exc:
            self._docker = None
            return {"ok": False, "error": exc.message[:300]}
        except Exception as exc:
            self._docker = None
            return {"ok": False, "error": f"Docker engine unreachable: {exc}"[:300]}

    def beat(self) -> None:
        state = {"name": self.name_, "pid": os.getpid(), "time": time.time(),
                 "docker": self.docker_state()}
        self.conn.set(self.key, json.dumps(state), ex=TTL_S)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat: Redis unavailable: %s", exc)
            self.stopping.wait(INTERVAL_S)

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(redis.RedisError):
            self.conn.delete(self.key)
