"""Prewarmed single-use containers (SPEC §4): created and started ahead with every
protection and the plugin's fixed mounts, waiting in the product's launcher. Each serves
exactly one run and is then removed: never reused, so no state leaks between runs.

A worker process keeps a small pool per container configuration (plugin digest, image,
limits, mounts). A run takes a ready container, writes its event into the container's
read-only inbox, hands the launcher a one-line request with a per-run token, and reads the
output until the launcher's closing line (with that token) ends both streams. The run is
then over without waiting for the engine's exit path; the container is removed off the
critical path, and a replacement is started in the background.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis
import requests
from docker.errors import DockerException
from docker.types import Mount
from docker.utils.socket import SocketError, demux_adaptor, frames_iter

from manager.core import metrics
from manager.core.config import ROOT, Settings
from manager.core.errors import SandboxUnavailable
from manager.core.records import Status
from manager.plugins.deps import mkdirs, private_root
from workers.sandbox import EVENT_PATH, LABEL_PID, LABEL_POOL, MAX_ENV_EVENT, Sandbox
from workers.spec import RunResult, RunSpec

log = logging.getLogger(__name__)
LAUNCHER = ROOT / "workers" / "launcher.py"  # copied into the cache: a path the engine sees
LAUNCHER_PATH = "/titan/launcher.py"
INBOX = "/titan/in"
READY = b"\x00TITAN-READY\n"
READY_TIMEOUT_S = 15
PREWARM_WAIT_S = 0.5  # a run waits this long for a prewarm already under way
TAIL = 160  # bytes held back per stream until it is known they are not the closing line
END_RE = re.compile(rb"\x00TITAN-END:([0-9a-f]{32}):(-?\d+):([01])\n\Z")


@dataclass
class Warm:
    """One prewarmed container: attached, started, its launcher waiting on stdin."""

    key: tuple[Any, ...]
    plugin: str
    container: Any
    sock: socket.socket
    inbox: Path
    attached: Any = None  # the attach response: closing it would close the socket
    ready_at: float = field(default_factory=time.monotonic)


def pool_key(spec: RunSpec) -> tuple[Any, ...]:
    """What a prewarmed container is made of; a run may only use a container whose
    configuration equals its own."""
    return (spec.plugin, spec.version, spec.image, spec.argv, spec.code_dir, spec.deps_dir,
            spec.read_only_dirs, spec.limits)


class WarmPool:
    """Per worker process. `take` is called by the run; a maintenance thread prewarms,
    expires idle containers, drains configurations no longer current, and removes used
    ones."""

    def __init__(self, settings: Settings, sandbox: Sandbox,
                 current_digests: Callable[[], set[str]] | None = None) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.current_digests = current_digests
        self.idle: dict[tuple[Any, ...], list[Warm]] = {}
        self.wanted: dict[tuple[Any, ...], tuple[RunSpec, float]] = {}
        self.unwarmable: set[str] = set()
        self.to_remove: list[Any] = []
        self.busy: set[str] = set()  # ids of containers serving a run right now
        self.warming: dict[tuple[Any, ...], threading.Event] = {}  # prewarms in progress
        self.ticks = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.prewarm_size > 0 and self.settings.prewarm_max > 0

    def take(self, spec: RunSpec) -> Warm | None:
        """A ready container for this configuration, or None (the run goes cold)."""
        if not self.enabled or spec.image in self.unwarmable:
            return None
        key = pool_key(spec)
        with self.lock:
            self.wanted[key] = (spec, time.monotonic())
            in_progress = self.warming.get(key)
        warm = self._pop(key)
        if warm is None and in_progress is not None:
            # One is being started already: cheaper and sooner than a second, cold one.
            in_progress.wait(PREWARM_WAIT_S)
            warm = self._pop(key)
        (metrics.POOL_HITS if warm else metrics.POOL_MISSES).labels(plugin=spec.plugin).inc()
        self._ensure_thread()
        if warm is None:
            self.wake.set()  # a first one; a replacement starts when this run is done
        return warm

    def _pop(self, key: tuple[Any, ...]) -> Warm | None:
        with self.lock:
            ready = self.idle.get(key) or []
            warm = ready.pop(0) if ready else None
            if warm:
                self.busy.add(warm.container.id)
        return warm

    def done(self, warm: Warm) -> None:
        """Single use: the container goes, whatever the outcome, and a replacement is
        started (after the run, so the two do not compete for the CPU)."""
        with self.lock:
            self.busy.discard(warm.container.id)
            self.to_remove.append(warm)
        self.wake.set()

    def close(self) -> None:
        """Removes every container of this pool (worker process shutdown)."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(READY_TIMEOUT_S + 30)  # a prewarm in progress finishes first
        with self.lock:
            doomed = [w for ws in self.idle.values() for w in ws] + self.to_remove
            self.idle, self.to_remove = {}, []
        for warm in doomed:
            self._discard(warm)

    def _ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="titan-prewarm", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._maintain()
            except Exception:
                log.exception("prewarm pool maintenance failed")
            self.wake.wait(2.0)
            self.wake.clear()

    def _maintain(self) -> None:
        with self.lock:
            removals, self.to_remove = self.to_remove, []
        for warm in removals:
            self._discard(warm)
        self._expire()
        self.ticks += 1
        if self.ticks % 15 == 0:
            self._sweep_leftovers()
        for key, (spec, _) in list(self.wanted.items()):
            while not self.stopping.is_set() and self._short(key):
                if not self._prewarm(key, spec):
                    break
        metrics.PREWARMED_IDLE.set(sum(len(v) for v in self.idle.values()))

    def _short(self, key: tuple[Any, ...]) -> bool:
        with self.lock:
            total = sum(len(v) for v in self.idle.values())
            return len(self.idle.get(key, [])) < self.settings.prewarm_size and \
                total < self.settings.prewarm_max

    def _expire(self) -> None:
        """Idle past the TTL, or of a plugin version no longer in the registry."""
        now = time.monotonic()
        try:
            current = self.current_digests() if self.current_digests else None
        except redis.RedisError as exc:  # Redis away: nothing is drained this time
            log.warning("prewarm pool: cannot read the registry: %s", exc)
            current = None
        stale = []
        with self.lock:
            for key in list(self.wanted):
                spec, used = self.wanted[key]
                gone = current is not None and Path(spec.code_dir).name.replace(
                    "sha256-", "sha256:") not in current
                if gone or now - used > self.settings.prewarm_idle_s:
                    del self.wanted[key]
                    stale += self.idle.pop(key, [])
            for key, ready in self.idle.items():
                keep = [w for w in ready if now - w.ready_at <= self.settings.prewarm_idle_s]
                stale += [w for w in ready if w not in keep]
                self.idle[key] = keep
        for warm in stale:
            self._discard(warm)

    def _prewarm(self, key: tuple[Any, ...], spec: RunSpec) -> bool:
        started = threading.Event()
        with self.lock:
            self.warming[key] = started
        try:
            return self._start(key, spec)
        finally:
            with self.lock:
                self.warming.pop(key, None)
            started.set()

    def _start(self, key: tuple[Any, ...], spec: RunSpec) -> bool:
        try:
            warm = start_warm(self.sandbox, spec, key)
        except WarmUnavailable as exc:
            log.warning("image %s cannot be prewarmed (%s): its runs stay cold", spec.image, exc)
            self.unwarmable.add(spec.image)
            return False
        except (DockerException, requests.RequestException, OSError) as exc:
            log.warning("prewarming %s failed: %s", spec.plugin, exc)
            return False
        with self.lock:
            if not self.stopping.is_set():
                self.idle.setdefault(key, []).append(warm)
                return True
        self._discard(warm)
        return False

    def _discard(self, warm: Warm) -> None:
        with contextlib.suppress(OSError):
            warm.sock.close()
        if self.sandbox._remove(warm.container):
            shutil.rmtree(warm.inbox, ignore_errors=True)
        elif not self.stopping.is_set():
            with self.lock:
                self.to_remove.append(warm)  # the engine may be away: again next time

    def _sweep_leftovers(self) -> None:
        """Any container of this process's pool that is neither ready nor serving a run
        (a removal lost while the engine was away) is removed."""
        with self.lock:
            known = self.busy | {w.container.id for ws in self.idle.values() for w in ws}
        try:
            mine = self.sandbox.mine({LABEL_POOL: "1", LABEL_PID: str(os.getpid())})
        except (DockerException, requests.RequestException):
            return
        for container in mine:
            if container.id not in known:
                self.sandbox._remove(container)


class WarmBroken(RuntimeError):
    """A prewarmed container could not be handed its run (nothing ran): go cold."""


class WarmUnavailable(RuntimeError):
    """The image cannot run the launcher (no python3, or it exited at once)."""


def warm_options(sandbox: Sandbox, spec: RunSpec, inbox: Path) -> dict[str, Any]:
    """The cold path's options, with the launcher waiting on stdin instead of the plugin,
    and the per-run parts (event, invocation id) left for the run to hand over."""
    options = sandbox.container_options(replace(spec, invocation_id="", event_json=""))
    env = {k: v for k, v in options["environment"].items()
           if k not in ("EVENT_DATA", "INVOCATION_ID")}
    env["EVENT_FILE"] = f"{INBOX}/event.json"
    mounts = [m for m in options["mounts"] if m["Target"] != EVENT_PATH]
    for target, source in ((LAUNCHER_PATH, str(launcher_copy(sandbox.settings))),
                           (INBOX, str(inbox))):
        mount = Mount(target, source, type="bind", read_only=True)
        mount["BindOptions"] = {"NonRecursive": True}
        mounts.append(mount)
    labels = {k: v for k, v in options["labels"].items() if k != "titan.invocation"}
    labels[LABEL_POOL] = "1"
    # The launcher is PID 1 (no docker-init): non-dumpable, so the plugin (same uid) can
    # read neither its environment nor /proc/1/fd/0, the stream its request came through.
    # It reaps like an init: a subreaper that waits for every process before it reports.
    return {**options, "command": ["python3", "-I", LAUNCHER_PATH], "environment": env,
            "mounts": mounts, "labels": labels, "stdin_open": True, "init": False}


def launcher_copy(settings: Settings) -> Path:
    """The launcher at a path the Docker engine can see: the worker's cache is at the same
    path on the host and in a worker container, its code is not."""
    target = private_root(settings.cache_dir) / "launcher.py"
    source = LAUNCHER.read_bytes()
    if not target.exists() or target.read_bytes() != source:
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(source)
        tmp.chmod(0o444)
        os.replace(tmp, target)
    return target


def start_warm(sandbox: Sandbox, spec: RunSpec, key: tuple[Any, ...]) -> Warm:
    """Creates, attaches to and starts one container, and waits for its launcher."""
    runs = mkdirs(private_root(sandbox.settings.cache_dir) / "runs", 0o700)
    inbox = mkdirs(runs / f"warm-{secrets.token_hex(8)}", 0o711)
    os.chmod(inbox, 0o711)
    client = sandbox.client
    try:
        container = client.containers.create(**warm_options(sandbox, spec, inbox))
    except BaseException:
        shutil.rmtree(inbox, ignore_errors=True)
        raise
    try:
        attached = client.api.attach_socket(container.id, params={
            "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        sock: socket.socket = getattr(attached, "_sock", attached)
        container.start()
        sock.settimeout(READY_TIMEOUT_S)
        try:
            _, data = next(frames_iter(sock, tty=False))
        except (StopIteration, TimeoutError, OSError) as exc:
            raise WarmUnavailable(f"no launcher answered: {exc or 'it exited'}") from None
        if data != READY:
            raise WarmUnavailable(f"launcher said {data[:80]!r}")
        sock.settimeout(None)
    except BaseException:
        sandbox._remove(container)
        shutil.rmtree(inbox, ignore_errors=True)
        raise
    return Warm(key, spec.plugin, container, sock, inbox, attached)


def run_warm(sandbox: Sandbox, warm: Warm, spec: RunSpec) -> RunResult:
    """One run in a prewarmed container; the same statuses and limits as a cold run."""
    t0 = time.time()
    event_file = warm.inbox / "event.json"
    event_file.write_text(spec.event_json, encoding="utf-8")
    event_file.chmod(0o444)
    token = secrets.token_hex(16)
    env = {"INVOCATION_ID": spec.invocation_id}
    if len(spec.event_json.encode()) <= MAX_ENV_EVENT:
        env["EVENT_DATA"] = spec.event_json
    request = json.dumps({"token": token, "argv": list(spec.argv), "env": env}) + "\n"
    result = RunResult(Status.RUNNING, started_at=t0, container_id=warm.container.id)
    ending = Ending(token)
    timer = threading.Timer(spec.timeout, sandbox._stop, (warm.container, result))
    timer.daemon = True
    try:
        warm.sock.sendall(request.encode())
    except OSError as exc:
        raise WarmBroken(f"the prewarmed container's stream is gone: {exc}") from exc
    try:
        result.container_start_s = time.time() - t0
        timer.start()
        sandbox.pump(ending.frames(warm.sock), warm.container, result)
        state = ending.state() or sandbox._wait(warm.container)
    except (OSError, SocketError) as exc:  # the engine went away mid-run, as on a cold run
        raise SandboxUnavailable(f"lost the prewarmed container's stream: {exc}") from exc
    finally:
        timer.cancel()
    result.extra["warm"] = True
    return sandbox.finish(result, state, spec, warm.container)


class Ending:
    """Reads the attach stream until the launcher's closing line (with this run's token)
    has ended both stdout and stderr, holding back each stream's tail until it is known
    not to be that line, and never passing the line itself on."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self.tails = {1: b"", 2: b""}
        self.ends: dict[int, tuple[int, int]] = {}

    def frames(self, sock: socket.socket) -> Iterator[tuple[bytes | None, bytes | None]]:
        for stream, data in frames_iter(sock, tty=False):
            if stream not in self.tails or stream in self.ends:
                continue
            buf = self.tails[stream] + data
            match = END_RE.search(buf)
            if match and match.group(1) == self.token:
                self.ends[stream] = (int(match.group(2)), int(match.group(3)))
                buf, self.tails[stream] = buf[:match.start()], b""
            else:
                buf, self.tails[stream] = buf[:-TAIL], buf[-TAIL:]
            if buf:
                yield demux_adaptor(stream, buf)
            if len(self.ends) == 2:
                return
        for stream, tail in self.tails.items():  # the stream ended without the closing line
            if tail:
                yield demux_adaptor(stream, tail)

    def state(self) -> dict[str, Any] | None:
        """The exit status the launcher reported on both streams, or None."""
        if len(self.ends) != 2 or self.ends[1] != self.ends[2]:
            return None
        code, oom = self.ends[1]
        return {"ExitCode": code, "OOMKilled": bool(oom)}
