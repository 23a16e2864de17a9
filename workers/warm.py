"""The warm launch strategy: a container created and started ahead (with every
protection and its configuration's mounts) waiting in the product's launcher, then handed
one run. The run writes its event into the container's read-only inbox, hands the
launcher a one-line request with a per-run token, and is followed by the one run loop
(workers.execute) until the launcher's closing line (with that token) ends both streams:
over without waiting for the engine's exit path. The pool (workers.pool) decides which
containers exist.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.utils.socket import demux_adaptor, frames_iter

from manager.core.config import ROOT, Settings
from manager.core.runs import RunUser
from manager.plugins.deps import mkdirs, private_root
from workers import options
from workers.container import ContainerHandle
from workers.execute import Launched, execute, write_event
from workers.identity import account_files
from workers.oom import OomWatch
from workers.sandbox import Sandbox
from workers.spec import PoolConfig, RunResult, RunSpec

log = logging.getLogger(__name__)
LAUNCHER = ROOT / "workers" / "launcher.py"  # copied into the cache: a path the engine sees
LAUNCHER_PATH = "/titan/launcher.py"
INBOX = "/titan/in"
READY = b"\x00TITAN-READY\n"
READY_TIMEOUT_S = 15
TAIL = 160  # bytes held back per stream until it is known they are not the closing line
END_RE = re.compile(rb"\x00TITAN-END:([0-9a-f]{32}):(-?\d+):([01])\n\Z")


@dataclass
class Warm:
    """One prewarmed container: attached, started, its launcher waiting on stdin."""

    config: PoolConfig
    container: ContainerHandle
    sock: socket.socket
    inbox: Path
    user: RunUser | None = None  # its identity, given back when it is removed
    attached: Any = None  # the attach response, kept open with the socket
    oom: OomWatch | None = None
    ready_at: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        """Our socket and the attach response's (each holds the connection open)."""
        for stream in (self.sock, self.attached):
            with contextlib.suppress(OSError, AttributeError):
                stream.close()


class WarmBroken(RuntimeError):
    """A prewarmed container could not be handed its run (nothing ran): go cold."""


class WarmUnavailable(RuntimeError):
    """The image cannot run the launcher (no python3, or it exited at once)."""


def warm_options(sandbox: Sandbox, config: PoolConfig, inbox: Path,
                 user: RunUser) -> dict[str, Any]:
    """The configuration's options (workers.options.base) with the launcher waiting on
    stdin instead of the plugin; the run's own part reaches the launcher with the run.
    The launcher is PID 1 (no docker-init): non-dumpable, so the plugin (same uid) can
    read neither its environment nor /proc/1/fd/0, the stream its request came through.
    It reaps like an init: a subreaper that waits for every process before it reports."""
    opts = options.base(config, sandbox.settings, sandbox.base_labels, user,
                        account_files(inbox, user))
    opts["mounts"] += [options.bind(LAUNCHER_PATH, str(launcher_copy(sandbox.settings))),
                       options.bind(INBOX, str(inbox))]
    opts["environment"]["EVENT_FILE"] = f"{INBOX}/event.json"
    opts["labels"][options.LABEL_POOL] = "1"
    return {**opts, "command": ["python3", "-I", LAUNCHER_PATH], "stdin_open": True,
            "init": False}


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


def start_warm(sandbox: Sandbox, config: PoolConfig) -> Warm:
    """Creates, attaches to and starts one container, and waits for its launcher."""
    runs = mkdirs(private_root(sandbox.settings.cache_dir) / "runs", 0o700)
    inbox = mkdirs(runs / f"warm-{secrets.token_hex(8)}", 0o711)
    os.chmod(inbox, 0o711)
    user = sandbox.identities.take()
    try:
        container = sandbox.create(warm_options(sandbox, config, inbox, user), config.image)
    except BaseException:
        sandbox.identities.give_back(user)
        shutil.rmtree(inbox, ignore_errors=True)
        raise
    try:
        attached = sandbox.client.api.attach_socket(container.id, params={
            "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        # A socket of our own on the same connection (the attach response keeps its own).
        sock = socket.socket(fileno=os.dup(attached.fileno()))
        container.container.start()
        sock.settimeout(READY_TIMEOUT_S)
        try:
            _, data = next(frames_iter(sock, tty=False))
        except (StopIteration, TimeoutError, OSError) as exc:
            raise WarmUnavailable(f"no launcher answered: {exc or 'it exited'}") from None
        if data != READY:
            raise WarmUnavailable(f"launcher said {data[:80]!r}")
        sock.settimeout(None)
    except BaseException:
        container.remove()
        sandbox.identities.give_back(user)
        shutil.rmtree(inbox, ignore_errors=True)
        raise
    return Warm(config, container, sock, inbox, user, attached, sandbox.oom.watch(container.id))


def run_warm(sandbox: Sandbox, warm: Warm, spec: RunSpec) -> RunResult:
    """The warm launch: hands the run to the launcher (event file, then a one-line request
    with a per-run token); the one run loop follows it, to the launcher's closing line."""
    t0 = time.time()
    assert warm.user is not None
    write_event(warm.inbox, spec, warm.user)
    token = secrets.token_hex(16)
    request = json.dumps({"token": token, "argv": list(spec.config.argv),
                          "env": options.run_env(spec)}) + "\n"
    try:
        if not alive(warm.sock):
            raise WarmBroken("the prewarmed container is gone (its stream has ended)")
        warm.sock.sendall(request.encode())
    except OSError as exc:
        raise WarmBroken(f"the prewarmed container's stream is gone: {exc}") from exc
    ending = Ending(token)
    result = execute(Launched(warm.container, ending.frames(warm.sock), ending.state,
                              oom=warm.oom), spec, sandbox.settings, sandbox, t0)
    result.extra["warm"] = True
    return result


def alive(sock: socket.socket) -> bool:
    """Whether a waiting launcher's stream is still open: a container that the engine
    stopped meanwhile (a restart, a docker stop) has closed it. Reads nothing."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # open, and nothing to read: the launcher is waiting


class Ending:
    """Reads the attach stream from the launcher's line that takes the run (GO, with this
    run's token; a stream that ends before it raises WarmBroken: nothing ran) until its
    closing line has ended both stdout and stderr, holding back each stream's tail until
    it is known not to be that line, and never passing either line on."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self.go = b"\x00TITAN-GO:" + self.token + b"\n"
        self.started = False
        self.tails = {1: b"", 2: b""}
        self.ends: dict[int, tuple[int, int]] = {}

    def frames(self, sock: socket.socket) -> Iterator[tuple[bytes | None, bytes | None]]:
        for stream, data in frames_iter(sock, tty=False):
            if stream not in self.tails or stream in self.ends:
                continue
            if stream == 1 and not self.started:
                data = self.tails[1] + data
                self.tails[1] = b""
                if len(data) < len(self.go) and self.go.startswith(data):
                    self.tails[1] = data  # the line is still arriving
                    continue
                self.started = True  # the launcher's: anything else means it ran already
                data = data.removeprefix(self.go)
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
        if not self.started:
            raise WarmBroken("the prewarmed container ended before its launcher took the "
                             "run")
        for stream, tail in self.tails.items():  # the stream ended without the closing line
            if tail:
                yield demux_adaptor(stream, tail)

    def state(self) -> dict[str, Any] | None:
        """The exit status the launcher reported on both streams, or None."""
        if len(self.ends) != 2 or self.ends[1] != self.ends[2]:
            return None
        code, oom = self.ends[1]
        return {"ExitCode": code, "OOMKilled": bool(oom)}
