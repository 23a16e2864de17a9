"""Reload on file changes (`python -m manager --watch`), via watchdog, debounced so an
editor's burst of writes makes one reload."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)


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
