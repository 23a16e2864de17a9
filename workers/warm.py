"""The warm launch: a container created and started ahead (`prewarm`: every protection,
its configuration's mounts, a uid of its own) waits in the product's launcher; a run is
handed to it (`handed_over`): its event written into the container's read-only inbox, a
one-line request with a per-run token sent to the launcher, which says GO (with the
token) before it starts the plugin and, once the plugin and all it left behind are gone,
ends both streams with a closing line (the token, the exit status, whether the OOM killer
struck): over without waiting for the engine's exit path. A container that ends before its
GO never started the plugin: WarmBroken, and the run goes cold. The pool (workers.pool)
decides which containers exist, and removes each after its one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager.core.config import ROOT, Settings
from manager.core.runs import RunUser
from manager.plugins.safefs import mkdirs, private_root
from workers import options
from workers.container import STDERR, STDOUT, ContainerHandle
from workers.engine import Engine
from workers.files import account_files, write_event
from workers.oom import OomWatch
from workers.run_loop import Launched
from workers.spec import PoolConfig, RunSpec

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
    inbox: Path
    user: RunUser  # its identity, given back when it is removed
    oom: OomWatch | None = None
    ready_mono: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        """Whether its launcher still waits: a container that the engine stopped meanwhile
        (a restart, a docker stop) has ended its stream; a waiting launcher says nothing."""
        return not self.container.readable(0)


class WarmBroken(RuntimeError):
    """A prewarmed container could not be handed its run (nothing ran): go cold."""


class WarmUnavailable(RuntimeError):
    """The image cannot run the launcher (no python3, or it exited at once)."""


def warm_options(engine: Engine, config: PoolConfig, inbox: Path,
                 user: RunUser) -> dict[str, Any]:
    """The configuration's options (workers.options.base) with the launcher waiting on
    stdin instead of the plugin; the run's own part reaches the launcher with the run.
    The launcher is PID 1 (no docker-init): non-dumpable, so the plugin (same uid) can
    read neither its environment nor /proc/1/fd/0, the stream its request came through.
    It reaps like an init: a subreaper that waits for every process before it reports."""
    opts = options.base(config, engine.settings, engine.base_labels, user,
                        account_files(inbox, user))
    opts["mounts"] += [options.bind(LAUNCHER_PATH, str(launcher_copy(engine.settings))),
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


def prewarm(engine: Engine, config: PoolConfig) -> Warm:
    """Creates, attaches to and starts one container, and waits for its launcher."""
    runs = mkdirs(private_root(engine.settings.cache_dir) / "runs", 0o700)
    inbox = mkdirs(runs / f"warm-{secrets.token_hex(8)}", 0o711)
    os.chmod(inbox, 0o711)
    user = engine.identities.take()
    container: ContainerHandle | None = None
    try:
        container = engine.create(warm_options(engine, config, inbox, user), config.image)
        container.attach(stdin=True)
        container.start()
        if not container.readable(READY_TIMEOUT_S):
            raise WarmUnavailable(f"no launcher answered within {READY_TIMEOUT_S}s")
        said = next(container.frames(), None)
        if said is None or said[1] != READY:
            raise WarmUnavailable(f"launcher said {said[1][:80] if said else 'nothing'!r}")
    except BaseException:
        if container is None or container.remove():
            engine.identities.give_back(user)
        shutil.rmtree(inbox, ignore_errors=True)
        raise
    return Warm(config, container, inbox, user, engine.oom.watch(container.id))


@contextlib.contextmanager
def handed_over(warm: Warm, spec: RunSpec) -> Iterator[Launched]:
    """Hands the run to a prewarmed container's launcher (the event file, then a one-line
    request with a per-run token). The container is the pool's to remove afterwards."""
    started_wall = time.time()
    if not warm.alive():
        raise WarmBroken("the prewarmed container is gone (its stream has ended)")
    write_event(warm.inbox, spec, warm.user)
    token = secrets.token_hex(16)
    request = json.dumps({"token": token, "argv": list(spec.config.argv),
                          "env": options.run_env(spec)}) + "\n"
    try:
        warm.container.send(request.encode())
    except OSError as exc:
        raise WarmBroken(f"the prewarmed container's stream is gone: {exc}") from exc
    ending = Ending(token)
    yield Launched(warm.container, ending.frames(warm.container.frames()), started_wall,
                   started_wall, ending.state, warm.oom, warm=True)


class Ending:
    """Reads the run's frames from the launcher's line that takes the run (GO, with this
    run's token; a stream that ends before it raises WarmBroken: nothing ran) until its
    closing line has ended both stdout and stderr, holding back each stream's tail until
    it is known not to be that line, and never passing either line on."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()
        self.go = b"\x00TITAN-GO:" + self.token + b"\n"
        self.started = False
        self.tails = {STDOUT: b"", STDERR: b""}
        self.ends: dict[int, tuple[int, int]] = {}

    def frames(self, frames: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
        for stream, data in frames:
            if stream not in self.tails or stream in self.ends:
                continue
            if stream == STDOUT and not self.started:
                data = self.tails[STDOUT] + data
                self.tails[STDOUT] = b""
                if len(data) < len(self.go) and self.go.startswith(data):
                    self.tails[STDOUT] = data  # the line is still arriving
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
                yield stream, buf
            if len(self.ends) == 2:
                return
        if not self.started:
            raise WarmBroken("the prewarmed container ended before its launcher took the "
                             "run")
        for stream, tail in self.tails.items():  # the stream ended without the closing line
            if tail:
                yield stream, tail

    def state(self) -> dict[str, Any] | None:
        """The exit status the launcher reported on both streams, or None."""
        if len(self.ends) != 2 or self.ends[STDOUT] != self.ends[STDERR]:
            return None
        code, oom = self.ends[STDOUT]
        return {"ExitCode": code, "OOMKilled": bool(oom)}
