"""The warm launch: a container created and started ahead (`prewarm`: every protection,
its configuration's mounts, a uid of its own) waits in the product's launcher, and for a
Python entrypoint with the plugin's interpreter already started (workers/zygote.py); a
run is handed to it (`handed_over`): its event written into the container's read-only
inbox, its payload file's checked copy into the private directory mounted where that
file lies, one request with a per-run token sent to the launcher (workers.handover),
which says GO (with the token) before it starts the plugin and, once the plugin and all
it left behind are gone, ends both streams with a closing line (the token, the exit
status, whether the OOM killer struck): over without waiting for the engine's exit path.
A container that ends before its GO never started the plugin: WarmBroken, and the run
goes cold. The pool (workers.pool) decides which containers exist, and removes each after
its one run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager.core.config import ROOT
from manager.core.errors import TitanError
from manager.core.groups import PrewarmSettings, SandboxSettings
from manager.core.runs import RunUser
from manager.egress.grants import pin
from manager.plugins.permissions import PayloadFile
from manager.plugins.safefs import mkdirs, private_root
from workers import options
from workers.container import ContainerHandle
from workers.engine import Engine
from workers.files import (
    SECRETS_PATH,
    account_files,
    place,
    secrets_dir,
    write_event,
    write_secrets,
)
from workers.handover import READY, ClosingLine, WarmBroken, request_of
from workers.oom import OomWatch
from workers.run_loop import Launched
from workers.run_spec import PoolConfig, RunSpec

# Copied into the cache (a path the engine sees), mounted read-only at /titan: the
# launcher (built from workers/launcher.c by make up) and the zygote (launcher.c's ZYGOTE:
# it imports nothing of ours).
LAUNCHER_PATH = "/titan/launcher"
ZYGOTE_PATH = "/titan/zygote.py"
TOOLS = {LAUNCHER_PATH: ROOT / "workers" / "titan-launcher",
         ZYGOTE_PATH: ROOT / "workers" / "zygote.py"}
INBOX = "/titan/in"
# `python main.py` and the like: what the plugin's interpreter, started ahead, can run.
PYTHON_RE = re.compile(r"python(3(\.\d+)?)?\Z")
# Memory the launcher and the preloaded interpreter hold, added to a prewarmed container's
# limit so that the plugin has what it declared (measured idle: under 1 MiB for the
# launcher, 5 MiB for the modules preloaded; sized when the launcher was an interpreter of
# 5 MiB, 7 under gVisor, and kept). Without it a plugin that fills its /tmp (half its
# memory) under gVisor was OOM-killed instead of ENOSPC.
HEADROOM_BYTES = 16 * 1024**2
READY_TIMEOUT_S = 15


@dataclass
class Warm:
    """One prewarmed container: attached, started, its launcher waiting on stdin."""

    config: PoolConfig
    container: ContainerHandle
    home: Path  # its private directory on the host: the inbox, account files, payload dirs
    user: RunUser  # its identity, given back when it is removed
    oom: OomWatch | None = None
    secrets: Path | None = None  # on the secrets tmpfs, mounted at /run/secrets
    address: str = ""  # on the egress network (a configuration with one)
    ready_mono: float = field(default_factory=time.monotonic)

    @property
    def inbox(self) -> Path:
        return self.home / "in"


    def payload_dir(self, index: int) -> Path:
        """The host directory mounted at the configuration's payload_dirs[index]."""
        return self.home / f"payload-{index}"

    def alive(self) -> bool:
        """Whether its launcher still waits: a container that the engine stopped meanwhile
        (a restart, a docker stop) has ended its stream; a waiting launcher says nothing."""
        return not self.container.readable(0)


class WarmUnavailable(TitanError):
    """No launcher answered (it is not built, or it exited at once)."""

    code = "warm_unavailable"


class PrewarmStopped(TitanError):
    """The container was stopped or killed from outside (an engine shutting down) before
    its launcher answered: says nothing of the image; another one is started later."""

    code = "prewarm_stopped"



def interpreter(config: PoolConfig, settings: PrewarmSettings) -> str | None:
    """The interpreter to start ahead for this configuration's entrypoint (`python
    main.py`, `python3 app.py --flag`), or None: its runs exec their entrypoint. Options
    for the interpreter itself (`python -u`, `-m`) are left to exec: they change how it
    starts."""
    argv = config.argv
    if not settings.interpreter or len(argv) < 2 or argv[1].startswith("-"):
        return None
    return argv[0] if PYTHON_RE.match(argv[0]) else None


def warm_options(engine: Engine, config: PoolConfig, home: Path, user: RunUser,
                 secrets: Path | None = None) -> dict[str, Any]:
    """The configuration's options (workers.options.base) with the launcher waiting on
    stdin instead of the plugin; the run's own part reaches the launcher with the run.
    The launcher is PID 1 (no docker-init): non-dumpable, so the plugin (same uid) can
    read neither its environment nor /proc/1/fd/0, the stream its request came through.
    It reaps like an init: a subreaper that waits for every process before it reports."""
    opts = options.base(config, engine.settings.sandbox, engine.base_labels, user,
                        account_files(home, user))
    tools = tools_copy(engine.settings.sandbox)
    opts["mounts"] += [options.bind(target, str(tools / Path(target).name)) for target in TOOLS]
    opts["mounts"].append(options.bind(INBOX, str(home / "in")))
    opts["mounts"] += [options.bind(target, str(home / f"payload-{i}"))
                       for i, target in enumerate(config.payload_dirs)]
    if secrets is not None:
        opts["mounts"].append(options.bind(SECRETS_PATH, str(secrets)))
    opts["environment"]["EVENT_FILE"] = f"{INBOX}/event.json"
    opts["labels"][options.LABEL_POOL] = "1"
    opts["mem_limit"] += HEADROOM_BYTES
    opts["memswap_limit"] += HEADROOM_BYTES
    command = [LAUNCHER_PATH]
    python = interpreter(config, engine.settings.prewarm)
    if python:
        command += ["--zygote", python, *(["--net"] if config.network else [])]
    return {**opts, "command": command, "stdin_open": True, "init": False}


def tools_copy(settings: SandboxSettings) -> Path:
    """The launcher and the zygote at paths the Docker engine can see: the worker's cache
    is at the same path on the host and in a worker container, its code is not."""
    directory = mkdirs(private_root(settings.cache_dir) / "tools", 0o755)
    for name, origin in TOOLS.items():
        try:
            source = origin.read_bytes()
        except FileNotFoundError:
            raise WarmUnavailable(f"{origin} is missing (make up builds the launcher from "
                                  "workers/launcher.c)") from None
        target = directory / Path(name).name
        if not target.exists() or target.read_bytes() != source:
            tmp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(source)
            tmp.chmod(0o555)
            os.replace(tmp, target)
    return directory


def prewarm(engine: Engine, config: PoolConfig) -> Warm:
    """Creates, attaches to and starts one container, and waits for its launcher."""
    runs = mkdirs(private_root(engine.settings.cache_dir) / "runs", 0o700)
    home = mkdirs(runs / f"warm-{secrets.token_hex(8)}", 0o711)
    for directory in (home, *(home / f"payload-{i}" for i in range(len(config.payload_dirs))),
                      home / "in"):
        directory.mkdir(mode=0o711, exist_ok=True)
        os.chmod(directory, 0o711)
    user = engine.identities.take()
    container: ContainerHandle | None = None
    private = None
    try:
        private = (secrets_dir(engine.settings.secret_files_dir, home.name)
                   if config.secrets else None)
        container = engine.create(warm_options(engine, config, home, user, private),
                                  config.image)
        container.attach(stdin=True)
        container.start()
        if not container.readable(READY_TIMEOUT_S):
            raise WarmUnavailable(f"no launcher answered within {READY_TIMEOUT_S}s")
        said = next(container.frames(), None)
        if said is None and container.wait(READY_TIMEOUT_S).by_stop_or_kill:
            raise PrewarmStopped("stopped before its launcher answered")
        if said is None or said[1] != READY:
            raise WarmUnavailable(f"launcher said {said[1][:80] if said else 'nothing'!r}")
    except BaseException:
        if container is None or container.remove():
            engine.identities.give_back(user)
        shutil.rmtree(home, ignore_errors=True)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        raise
    address = container.address(config.network) if config.network else ""
    return Warm(config, container, home, user, engine.oom.watch(container.id), private,
                address)


@contextlib.contextmanager
def handed_over(warm: Warm, spec: RunSpec, payload: PayloadFile | None) -> Iterator[Launched]:
    """Hands the run to a prewarmed container's launcher (the event file, the payload
    file's checked copy, then a one-line request with a per-run token). The container is
    the pool's to remove afterwards."""
    started_wall = time.time()
    if not warm.alive():
        raise WarmBroken("the prewarmed container is gone (its stream has ended)")
    write_event(warm.inbox, spec, warm.user)
    if warm.secrets is not None:
        write_secrets(warm.secrets, spec.secrets, warm.user)
    if spec.grant_file and warm.address:  # before the plugin starts: no window at all
        pin(spec.grant_file, warm.address)
    if payload is not None and payload.handle is not None:
        stage_payload(warm, payload)
    token = secrets.token_hex(16)
    try:
        warm.container.send(request_of(token, spec.config.argv, options.run_env(spec)))
    except OSError as exc:
        raise WarmBroken(f"the prewarmed container's stream is gone: {exc}") from exc
    ending = ClosingLine(token)
    yield Launched(warm.container, ending.frames(warm.container.frames()), started_wall,
                   started_wall, ending.state, warm.oom, warm=True)


def stage_payload(warm: Warm, payload: PayloadFile) -> None:
    """The checked copy, readable by the run's uid alone, at the payload's path inside the
    private directory the container has mounted where that path lies; the directories on
    the way are root's, as a cold container's mount points are."""
    placed = place(warm.config, payload.path)
    if placed is None:
        raise WarmBroken(f"{payload.path} lies outside this container's payload directories")
    index, relative = placed
    target = warm.payload_dir(index)
    for part in Path(relative).parts[:-1]:
        target = target / part
        target.mkdir(mode=0o755, exist_ok=True)
        os.chmod(target, 0o755)  # whatever the umask: the run's uid passes through
    payload.stage(target / Path(relative).name, warm.user)
