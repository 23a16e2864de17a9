"""The manager process: registry load, bus listener, REST API and /metrics in one process.

SIGHUP reloads the plugins; SIGTERM/SIGINT stop the listener between entries (an entry
being handled is finished and acknowledged, or left pending for another listener)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import waitress

from manager import metrics
from manager.api import create_app
from manager.clients import redis_client
from manager.config import Settings
from manager.dispatch import Dispatcher, make_celery
from manager.listener import Listener
from manager.registry import PluginStatus, Registry
from manager.sweeper import Sweeper
from manager.watch import PluginWatcher

log = logging.getLogger("titan.manager")


class Manager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn = redis_client(settings)
        self.registry = Registry(self.conn, settings)
        self.dispatcher = Dispatcher(self.conn, settings, make_celery(settings))
        listener_conn = redis_client(settings)
        self.sweeper = Sweeper(listener_conn, settings, self.dispatcher)
        self.listener = Listener(listener_conn, settings, Registry(listener_conn, settings),
                                 self.dispatcher, housekeeping=self.sweeper.maybe_sweep)
        self.app = create_app(settings, self.conn, self.registry, self.dispatcher)
        self.server: Any = None


    def reload(self) -> dict[str, Any]:
        changes = self.registry.reload()
        metrics.count_reload(changes)
        log.info("plugins reloaded: %s", {k: len(v) for k, v in changes.items()})
        for item in changes["rejected"]:
            log.warning("plugin %s rejected: %s", item["name"], "; ".join(item["errors"]))
        return changes

    def plugin_counts(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in PluginStatus), 0)
        for entry in self.registry.entries().values():
            counts[entry.status.value] += 1
        return counts

    def queue_depths(self) -> dict[str, int]:
        s = self.settings
        pending = self.conn.xpending(s.event_stream, s.consumer_group)
        return {s.task_queue: self.conn.llen(s.task_queue),
                "events_pending": int(pending["pending"]) if pending else 0,
                "dead_letters": self.conn.xlen(s.dead_stream)}

    def serve(self, watch: bool = False) -> None:
        """Runs until SIGTERM/SIGINT; with `watch`, reloads when plugin files change."""
        self.reload()
        if watch:
            PluginWatcher(self.settings.plugins_dir, self._safe_reload).start()
        metrics.serve(self.settings.metrics_port, self.settings.api_host,
                      metrics.StateCollector(self.plugin_counts, self.queue_depths))
        listener = threading.Thread(target=self.listener.run, name="listener", daemon=True)
        listener.start()
        # waitress, a production WSGI server, in this process beside the listener thread.
        self.server = waitress.create_server(self.app, host=self.settings.api_host,
                                             port=self.settings.api_port, threads=8,
                                             ident="titan-plugin-manager")
        signal.signal(signal.SIGHUP, lambda *_: self._safe_reload())
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown())
        signal.signal(signal.SIGINT, lambda *_: self.shutdown())
        log.info("API on http://%s:%d, metrics on :%d, listening to %s",
                 self.settings.api_host, self.settings.api_port, self.settings.metrics_port,
                 self.settings.event_stream)
        self.server.run()  # until shutdown(); requests in progress finish first
        listener.join(timeout=self.settings.read_block_ms / 1000 + 5)
        log.info("manager stopped")

    def _safe_reload(self) -> None:
        try:
            self.reload()
        except Exception:
            metrics.count_reload(None)
            log.exception("reload on SIGHUP failed")

    def shutdown(self) -> None:
        log.info("stopping: listener first, then the API")
        self.listener.stop()
        # waitress's loop ends on SystemExit: it stops accepting, lets the requests in
        # progress finish, and returns.
        raise SystemExit(0)
