"""The manager process: registry load, bus listener, REST API and /metrics in one process.

SIGHUP reloads the plugins; SIGTERM/SIGINT stop the listener between entries (an entry
being handled is finished and acknowledged, or left pending for another listener)."""

from __future__ import annotations

import logging
import resource
import signal
import threading
import time
from typing import Any

import waitress
from flask import Flask
from prometheus_client import CollectorRegistry, make_wsgi_app

from manager.api.app import create_app
from manager.api.front import Front, server_context
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener
from manager.bus.sweeper import Sweeper
from manager.bus.timers import Timers
from manager.core import metrics
from manager.core.config import Settings
from manager.core.contract import make_celery, queued_tasks
from manager.core.errors import TitanError
from manager.core.groups import ApiSettings
from manager.core.lines import Line, lines
from manager.core.observer import observer
from manager.core.wiring import Wiring
from manager.plugins.janitor import CacheJanitor
from manager.plugins.loader import PluginStatus
from manager.plugins.registry import Registry
from manager.plugins.watch import PluginWatcher, SettleRetry

log = logging.getLogger("titan.manager")
METRICS_CONNECTIONS = 64


def api_server(app: Flask, api: ApiSettings, unix_socket: str) -> Any:
    """waitress (a production WSGI server) with the limits that keep one client from
    holding the API: a body over the limit is refused from its Content-Length before any
    of it is read, idle and half-sent connections are dropped after a short timeout, and
    enough connections are allowed that a pile of them cannot lock the others out.

    Always on a unix socket only root can open (0600 in the root-only run directory): the
    CLI's channel, and, behind the TCP front (manager.api.front), the TCP port's. Each
    server has its own threads and connection limit, so a flood of TCP connections from
    any local account never reaches the CLI's."""
    raise_nofile(api)
    where = {"unix_socket": unix_socket, "unix_socket_perms": "600"}
    return waitress.create_server(
        app, threads=api.threads, connection_limit=api.connection_limit,
        channel_timeout=api.channel_timeout,
        cleanup_interval=max(1, api.channel_timeout // 4),
        max_request_body_size=app.config["MAX_CONTENT_LENGTH"],
        # poll, not select: select cannot watch a descriptor numbered over 1024, and a
        # thousand held connections take the process's descriptors past that
        asyncore_use_poll=True, ident="titan-plugin-manager", **where)


def tcp_api(app: Flask, api: ApiSettings) -> tuple[Any, Front]:
    """The API's TCP port: the front (manager.api.front: deadlines, a cap per peer, HTTPS
    with TITAN_API_TLS=1), started, passing to a waitress of its own on a private socket
    (returned to be run)."""
    behind = api.socket.with_name("api-tcp.sock")
    server = api_server(app, api, str(behind))
    front = Front(api, str(behind), api.host, api.port,
                  server_context(api.tls_cert, api.tls_key)
                  if api.tls else None, max_body=app.config["MAX_CONTENT_LENGTH"])
    front.start()
    return server, front


def metrics_server(registry: CollectorRegistry, api: ApiSettings) -> tuple[Any, Front]:
    """/metrics on waitress with a bounded number of connections and threads of its own,
    on a private socket behind a front on metrics_port (manager.api.front: deadlines and
    a cap per peer), so no account can hold it or, through it, the process's descriptors
    (prometheus-client's own server spends a thread and a descriptor on each)."""
    raise_nofile(api)
    behind = api.socket.with_name("metrics.sock")
    server = waitress.create_server(
        make_wsgi_app(registry), unix_socket=str(behind), unix_socket_perms="600",
        threads=2, connection_limit=METRICS_CONNECTIONS, channel_timeout=10,
        cleanup_interval=2, asyncore_use_poll=True, ident="titan-metrics")
    return server, Front(api, str(behind), api.host, api.metrics_port,
                         name="metrics")


def raise_nofile(api: ApiSettings) -> None:
    """Descriptors for every server's connection limit (two API servers and /metrics)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * api.connection_limit + METRICS_CONNECTIONS + 512
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Manager:
    def __init__(self, settings: Settings) -> None:
        if not settings.api_token:
            raise TitanError("TITAN_API_TOKEN is not set: the API never runs without a key "
                             "(make up generates one into run/api.token)")
        self.settings = settings
        self.wiring = Wiring.connect(settings)  # the API's
        listening = Wiring.connect(settings)  # the listener's blocking reads, the sweeper
        self.conn = self.wiring.conn
        self.registry = Registry(self.wiring)
        self.dispatcher = Dispatcher(self.wiring, make_celery(settings.broker))
        self.sweeper = Sweeper(listening, self.dispatcher)
        self.janitor = CacheJanitor(settings.cache)
        self.listener = Listener(listening, Registry(listening), self.dispatcher,
                                 housekeeping=self.housekeeping)
        self.resettle = SettleRetry(self._safe_reload)
        clock = Wiring.connect(settings)  # the timers' own: a tick never waits on a read
        self.timers = Timers(clock, Registry(clock))
        self.app = create_app(self.wiring, self.registry, self.dispatcher,
                              on_reload=self.reloaded)
        self.server: Any = None

    def housekeeping(self) -> None:
        """On the listener's housekeeping tick: abandoned runs, then this host's cache."""
        self.sweeper.maybe_sweep()
        try:
            self.janitor.evict()
        except OSError as exc:
            log.warning("cache eviction failed: %s", exc)

    def reload(self) -> dict[str, Any]:
        changes = self.registry.reload()
        self.reloaded(changes)
        return changes

    def reloaded(self, changes: dict[str, Any]) -> None:
        """After every reload (SIGHUP, the watcher, the API, a retry): what changed is
        logged, and directories still being written are tried again until they settle."""
        observer().reloaded(changes)
        log.info("plugins reloaded: %s", {k: len(v) for k, v in changes.items()})
        for item in changes["rejected"]:
            log.warning("plugin %s rejected: %s", item["name"], "; ".join(item["errors"]))
        for item in changes["warnings"]:
            log.warning("plugin %s: %s", item["name"], "; ".join(item["warnings"]))
        if changes["unsettled"]:
            self.resettle.unsettled([i["name"] for i in changes["unsettled"]])
        else:
            self.resettle.settled()

    def plugin_counts(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in PluginStatus), 0)
        for entry in self.registry.entries().values():
            counts[entry.status.value] += 1
        return counts

    def plugin_lines(self) -> dict[str, Line]:
        return lines(self.conn, self.wiring.keys, self.registry.entries(), time.time())

    def queue_depths(self) -> dict[str, int]:
        s = self.settings
        pending = self.conn.xpending(s.event_stream, s.consumer_group)
        return {s.task_queue: queued_tasks(self.conn, s.broker),
                "events_pending": int(pending["pending"]) if pending else 0,
                "dead_letters": self.conn.xlen(s.dead_stream)}

    def serve(self, watch: bool = False) -> None:
        """Runs until SIGTERM/SIGINT; with `watch`, reloads when plugin files change."""
        self.reload()
        if watch:
            PluginWatcher(self.settings.plugins_dir, self._safe_reload).start()
        self.settings.api_socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        scraped, scraped_front = metrics_server(metrics.registry_for(
            metrics.StateCollector(self.plugin_counts, self.queue_depths, self.plugin_lines)),
            self.settings.api)
        threading.Thread(target=scraped.run, name="metrics", daemon=True).start()
        scraped_front.start()
        listener = threading.Thread(target=self.listener.run, name="listener", daemon=True)
        listener.start()
        timers = threading.Thread(target=self.timers.run, name="timers", daemon=True)
        timers.start()
        front = self.tcp_server()  # beside the listener thread
        local = api_server(self.app, self.settings.api, str(self.settings.api_socket))
        threading.Thread(target=local.run, name="api-socket", daemon=True).start()
        signal.signal(signal.SIGHUP, lambda *_: self._safe_reload())
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown())
        signal.signal(signal.SIGINT, lambda *_: self.shutdown())
        log.info("API on %s://%s:%d and %s, metrics on :%d, listening to %s",
                 "https" if self.settings.api_tls else "http", self.settings.api_host,
                 self.settings.api_port, self.settings.api_socket,
                 self.settings.metrics_port, self.settings.event_stream)
        try:
            self.server.run()  # until shutdown(); requests in progress finish first
        finally:
            local.close()
            front.stop()
            scraped_front.stop()
        listener.join(timeout=self.settings.read_block_ms / 1000 + 5)
        timers.join(timeout=5)
        log.info("manager stopped")

    def tcp_server(self) -> Front:
        self.server, front = tcp_api(self.app, self.settings.api)
        return front

    def _safe_reload(self) -> None:
        try:
            self.reload()
        except Exception:
            observer().reloaded(None)
            log.exception("reload on SIGHUP failed")

    def shutdown(self) -> None:
        log.info("stopping: listener and timers first, then the API")
        self.listener.stop()
        self.timers.stop()
        # waitress's loop ends on SystemExit: it stops accepting, lets the requests in
        # progress finish, and returns.
        raise SystemExit(0)
