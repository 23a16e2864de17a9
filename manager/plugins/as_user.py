"""Opening a host path with a run's rights, judged by the kernel.

The worker is root; a run is not. So whether a run may read a host path is never decided
here from owners and mode bits (that misses ACLs, LSMs and whatever else the kernel
enforces): a process that holds only the run's uid and group (no supplementary groups, no
capabilities) walks the path from `/` one component at a time with O_NOFOLLOW, opens the
last one, and hands the descriptor back over a socket (SCM_RIGHTS). What the caller then
checks and reads is exactly the object the run's identity could open; a symlink anywhere
on the way, or a component the run may not search or read, is refused by the kernel.

That process is a fork of the opener (manager.plugins.opener), which each worker process
starts once: a fork of a small single-threaded process costs about a millisecond, where
starting an interpreter per path cost 16.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

from manager.core.errors import TitanError

PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
OPENER = Path(__file__).with_name("opener.py")
OPEN_TIMEOUT_S = 10


class OpenRefused(TitanError):
    """The kernel refused the run's identity: `errno` at the `depth`-th component."""

    code = "open_refused"

    def __init__(self, errno_: int, depth: int) -> None:
        super().__init__(os.strerror(errno_), errno=errno_, depth=depth)
        self.errno = errno_
        self.depth = depth

    @property
    def missing(self) -> bool:
        return self.errno == errno.ENOENT

    @property
    def denied(self) -> bool:
        return self.errno in (errno.EACCES, errno.EPERM)

    @property
    def linked(self) -> bool:
        """A symlink (or something else than a directory) where a directory was due."""
        return self.errno in (errno.ELOOP, errno.ENOTDIR)


class Opener:
    """This process's opener: its requests go down one socket, each with a socket of its
    own for the answer (so threads may ask at once). Started again if it died."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.control: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [PYTHON, "-I", "-S", str(OPENER), str(theirs.fileno())], env={}, cwd="/",
                start_new_session=True,  # a Ctrl-C at the worker's terminal is not its
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        self.control = ours
        return ours

    def ask(self, request: dict[str, object]) -> tuple[bytes, list[int]]:
        mine, reply = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with mine:
            with reply:
                self.send(json.dumps(request).encode(), reply.fileno())
            mine.settimeout(OPEN_TIMEOUT_S)
            message, fds, _, _ = socket.recv_fds(mine, 4096, 1)
        return message, fds

    def send(self, message: bytes, reply: int) -> None:
        with self.lock:
            for _ in range(2):
                control = self.control or self.start()
                try:
                    socket.send_fds(control, [message], [reply])
                    return
                except OSError:  # it is gone: once more, with a new one
                    self.stop()
            raise OSError(errno.EIO, "the opener does not take requests")

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()  # it exits when it reads the end
            self.control = None
        if self.process is not None:
            self.process.wait()
            self.process = None


@functools.cache
def opener(pid: int) -> Opener:
    """One opener per process (a forked process starts its own: its parent's is not its
    child)."""
    return Opener()


def open_as(path: str, uid: int, gid: int, directory: bool = False) -> int:
    """A descriptor of `path` opened by `uid`:`gid` alone (read-only; O_NOFOLLOW at every
    component). Raises OpenRefused with the kernel's errno; the caller owns the descriptor."""
    if uid <= 0 or gid <= 0:
        raise ValueError("a path is opened as a run's identity, never as root")
    message, fds = opener(os.getpid()).ask(
        {"path": path, "uid": uid, "gid": gid, "directory": directory})
    if fds:
        return fds[0]
    if not message:  # the fork ended before it said anything
        raise OSError(errno.EIO, f"the opener gave no answer for {path}")
    answer = json.loads(message)
    raise OpenRefused(int(answer["errno"]), int(answer["depth"]))
