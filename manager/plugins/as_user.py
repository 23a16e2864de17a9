"""Opening a host path with a run's rights, judged by the kernel.

The worker is root; a run is not. So whether a run may read a host path is never decided
here from owners and mode bits (that misses ACLs, LSMs and whatever else the kernel
enforces): a child process that holds only the run's uid and group (no supplementary
groups, no capabilities: an unprivileged exec of the system's Python) walks the path from
`/` one component at a time with O_NOFOLLOW, opens the last one, and hands the
descriptor back over a socketpair (SCM_RIGHTS). What the caller then checks and reads is
exactly the object the run's identity could open; a symlink anywhere on the way, or a
component the run may not search or read, is refused by the kernel itself.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess

PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
OPEN_TIMEOUT_S = 10
# Runs as the run's uid: standard library only, no site-packages, no environment.
CHILD = r"""
import errno, json, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
parts = [p for p in sys.argv[2].split("/") if p]
directory = sys.argv[3] == "dir"
current, n = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), 0
try:
    for n, part in enumerate(parts):
        if part in (".", ".."):
            raise OSError(errno.EINVAL, "a '.' or '..' component")
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        if n < len(parts) - 1:
            flags |= os.O_PATH | os.O_DIRECTORY
        elif directory:
            flags |= os.O_RDONLY | os.O_DIRECTORY
        else:
            flags |= os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
        opened = os.open(part, flags, dir_fd=current)
        os.close(current)
        current = opened
    socket.send_fds(sock, [b"{}"], [current])
except OSError as exc:
    sock.sendall(json.dumps({"errno": exc.errno, "depth": n + 1}).encode())
"""


class Refusal(Exception):
    """The kernel refused the run's identity: `errno` at the `depth`-th component."""

    def __init__(self, errno_: int, depth: int) -> None:
        super().__init__(os.strerror(errno_))
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


def open_as(path: str, uid: int, gid: int, directory: bool = False) -> int:
    """A descriptor of `path` opened by `uid`:`gid` alone (read-only; O_NOFOLLOW at every
    component). Raises Refusal with the kernel's errno; the caller owns the descriptor."""
    if uid <= 0 or gid <= 0:
        raise ValueError("a path is opened as a run's identity, never as root")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            done = subprocess.run([PYTHON, "-I", "-S", "-c", CHILD, str(theirs.fileno()),
                                   path, "dir" if directory else "file"],
                                  user=uid, group=gid, extra_groups=[], env={}, cwd="/",
                                  pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=OPEN_TIMEOUT_S, check=False)
        finally:
            theirs.close()
        message, fds, _, _ = socket.recv_fds(ours, 4096, 1)
    if fds:
        return fds[0]
    if not message:  # the child died before it said anything
        raise OSError(errno.EIO, f"the opener exited with {done.returncode}: "
                                 f"{done.stderr[-200:].decode(errors='replace')}")
    answer = json.loads(message)
    raise Refusal(int(answer["errno"]), int(answer["depth"]))
