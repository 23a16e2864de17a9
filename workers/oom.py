"""The kernel's word on whether a run's container ran out of memory.

The engine's `OOMKilled` flag is set when its OOM event arrives, which can be after the
container's exit was reported (a known race: under load the flag is still false when the
worker reads it, and containerd drops the event altogether when the cgroup is gone before
it looks). The kernel tells the container's memory cgroup first, before it kills anything:

- cgroup v1: an eventfd registered on `memory.oom_control` (through
  `cgroup.event_control`) is signalled each time the cgroup's OOM killer is invoked, and
  once more when the cgroup is removed;
- cgroup v2: `memory.events` counts `oom_kill` and wakes a poller when it changes.

By the time a container's output ends, its cgroup is already gone (measured: always), so
nothing can be read afterwards. One thread per worker process therefore waits on every
run's notification and judges it while the cgroup still exists: a v1 signal that arrives
while `memory.oom_control` can still be read is an OOM (the removal's signal comes only
after the files are gone), and a v2 `oom_kill` above zero is one. A thread starved so long
that it reads both at once after the removal still counts two signals: an OOM and the
removal. Where the cgroup cannot be seen (a worker inside a container), `watch` returns
None and the run is judged by the engine's flag and the launcher's count alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dirs(container_id: str, root: Path = CGROUP_ROOT) -> list[tuple[int, Path]]:
    """Where the engine puts a container's memory cgroup, by version, for the cgroupfs
    and the systemd drivers (the first that exists is the container's)."""
    return [(1, root / "memory" / "docker" / container_id),
            (1, root / "memory" / "system.slice" / f"docker-{container_id}.scope"),
            (2, root / "docker" / container_id),
            (2, root / "system.slice" / f"docker-{container_id}.scope")]


def oom_kills(text: str) -> int:
    """The `oom_kill` count in a v1 `memory.oom_control` or a v2 `memory.events`."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


@dataclass
class OomWatch:
    """One container's memory cgroup, from its start until the run's end is judged."""

    version: int
    control: int  # v1 memory.oom_control / v2 memory.events, opened at the start
    eventfd: int | None  # v1 only
    oom: bool = False
    signals: int = 0  # v1: eventfd signals seen (OOMs, then the removal)
    gone: bool = False
    closed: bool = field(default=False, repr=False)

    @property
    def wakes(self) -> int:
        return self.eventfd if self.eventfd is not None else self.control

    def judge(self) -> None:
        """Reads what the kernel said since the last look (the watcher's lock held)."""
        if self.closed:
            return
        if self.eventfd is not None:
            with contextlib.suppress(BlockingIOError):
                self.signals += os.eventfd_read(self.eventfd)
        try:
            count = oom_kills(os.pread(self.control, 4096, 0).decode())
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise
            self.gone = True
            self.oom = self.oom or self.signals >= 2
            return
        # The cgroup exists: a v1 signal now is the OOM killer's (it precedes its kill).
        self.oom = self.oom or count > 0 or (self.eventfd is not None and self.signals > 0)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self.control, self.eventfd):
                if fd is not None:
                    os.close(fd)


class OomWatcher:
    """Per worker process: `watch` a container right after it starts, `killed` once its
    run has ended. Its thread is started with its process (`start`), and again by a watch
    should it have died."""

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.poller = select.epoll()
        self.watches: dict[int, OomWatch] = {}
        self.thread: threading.Thread | None = None

    def watch(self, container_id: str) -> OomWatch | None:
        """Starts watching a running container's memory cgroup; None where it is not to
        be found from here (then the engine's flag is all there is)."""
        for version, directory in cgroup_dirs(container_id, self.root):
            try:
                watch = self._open(version, directory)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot watch %s for OOM kills: %s", directory, exc)
                return None
            with self.lock:
                watch.judge()  # an OOM before the registration shows in the count
                self.watches[watch.wakes] = watch
                self.poller.register(watch.wakes, select.EPOLLIN if watch.eventfd is not None
                                     else select.EPOLLPRI)
                self.start()
            return watch
        return None

    @staticmethod
    def _open(version: int, directory: Path) -> OomWatch:
        if version == 2:
            return OomWatch(2, os.open(directory / "memory.events", os.O_RDONLY | os.O_CLOEXEC),
                            None)
        control = os.open(directory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            os.close(control)
            raise
        try:
            with open(directory / "cgroup.event_control", "w") as fh:
                fh.write(f"{efd} {control}")
        except OSError:
            os.close(control)
            os.close(efd)
            raise
        return OomWatch(1, control, efd)

    def killed(self, watch: OomWatch | None) -> bool:
        """Whether the kernel's OOM killer acted in the container; stops watching it."""
        if watch is None:
            return False
        with self.lock:
            watch.judge()
            self.watches.pop(watch.wakes, None)
            with contextlib.suppress(OSError, ValueError):
                self.poller.unregister(watch.wakes)
            watch.close()
            return watch.oom

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="titan-oom", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                ready = self.poller.poll()
            except InterruptedError:
                continue
            with self.lock:
                for fd, _ in ready:
                    watch = self.watches.get(fd)
                    if watch is None:
                        continue
                    try:
                        watch.judge()
                    except OSError as exc:
                        log.warning("reading an OOM watch failed: %s", exc)
                        watch.gone = True
                    if watch.gone:  # the cgroup's last word was said: stop waking on it
                        with contextlib.suppress(OSError, ValueError):
                            self.poller.unregister(fd)
