"""What makes a reload happen on its own: file changes (`python -m manager --watch`, via
watchdog, debounced so an editor's burst of writes makes one reload), and a directory
that was still being written at the last reload (tried again until it settles)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from manager.core.retry import RESETTLE, Backoff

log = logging.getLogger(__name__)


class SettleRetry:
    """Reloads again while plugin directories are still being written: later and later
    (backoff), each attempt logged, for as long as it takes; a reload that finds every
    directory settled ends it. One timer at a time, re-armed from its own reload."""

    def __init__(self, reload: Callable[[], object], backoff: Backoff = RESETTLE) -> None:
        self._reload = reload
        self.backoff = backoff
        self.attempts = 0
        self._armed = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def unsettled(self, names: list[str]) -> None:
        """The last reload left these directories unsettled: try again later."""
        with self._lock:
            if self._armed:
                return
            self._armed = True
            delay = self.backoff.delay(self.attempts)
            self.attempts += 1
            log.warning("plugins still being written, their old versions serving: %s; "
                        "reload attempt %d in %.1fs", ", ".join(names), self.attempts, delay)
            self._timer = threading.Timer(delay, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def settled(self) -> None:
        with self._lock:
            if self.attempts:
                log.info("every plugin directory settled after %d more reloads",
                         self.attempts)
            self.attempts = 0

    def _fire(self) -> None:
        with self._lock:
            self._armed = False
        self._reload()  # which calls unsettled() or settled() again

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()


class PluginWatcher(FileSystemEventHandler):
    def __init__(self, path: Path, on_change: Callable[[], object], debounce_s: float = 1.0):
        self.path = path
        self.on_change = on_change
        self.debounce_s = debounce_s
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self.observer = Observer()

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.observer.schedule(self, str(self.path), recursive=True)
        self.observer.start()
        log.info("watching %s for plugin changes", self.path)

    def stop(self) -> None:
        self.observer.stop()
        with self._lock:
            if self._timer:
                self._timer.cancel()

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = str(event.src_path)
        if "__pycache__" in path or path.endswith((".pyc", ".swp", "~")) or \
                event.event_type in ("opened", "closed_no_write"):
            return
        with self._lock:
            if self._timer:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce_s, self.on_change)
            self._timer.daemon = True
            self._timer.start()
