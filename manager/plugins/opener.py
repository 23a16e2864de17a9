"""The opener: opens host paths with a run's identity for the worker process that
started it (manager.plugins.as_user). Standard library only; started as root with `-I -S`,
no environment and no descriptor but its end of the worker's socket.

It is started once and forks per request: the fork (a small, single-threaded process)
takes the run's gid and uid with no supplementary groups, which leaves it no capability,
walks the path from `/` one component at a time with O_NOFOLLOW, and sends the descriptor
it opened (or the errno and the depth where the kernel refused) down the reply socket
that came with the request. It never reads a byte of what it opens. It exits when the
worker process's end of its socket closes.
"""

import errno
import json
import os
import signal
import socket
import sys

GIVE_UP_S = 15  # a fork stuck in an open (a hung mount) is ended by SIGALRM
MAX_REQUEST = 1 << 16


def walk(parts, directory):
    """A descriptor of the path `parts`, opened component by component."""
    current, depth = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), 0
    try:
        for depth, part in enumerate(parts, start=1):
            if part in (".", ".."):
                raise OSError(errno.EINVAL, "a '.' or '..' component")
            flags = os.O_NOFOLLOW | os.O_CLOEXEC
            if depth < len(parts):
                flags |= os.O_PATH | os.O_DIRECTORY
            elif directory:
                flags |= os.O_RDONLY | os.O_DIRECTORY
            else:
                flags |= os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
            opened = os.open(part, flags, dir_fd=current)
            os.close(current)
            current = opened
    except OSError as exc:
        os.close(current)
        exc.depth = depth
        raise
    return current


def answer(request, reply):
    """In the fork: become the run, open, reply."""
    signal.alarm(GIVE_UP_S)
    if request["uid"] <= 0 or request["gid"] <= 0:
        raise ValueError("a path is opened as a run's identity, never as root")
    os.setgroups([])
    os.setgid(request["gid"])
    os.setuid(request["uid"])  # all three uids: nothing of root is left
    parts = [p for p in request["path"].split("/") if p]
    try:
        fd = walk(parts, request["directory"])
    except OSError as exc:
        reply.sendall(json.dumps({"errno": exc.errno, "depth": exc.depth}).encode())
        return
    socket.send_fds(reply, [b"{}"], [fd])


def serve(control):
    while True:
        message, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 1)
        if not message:
            return  # the worker process is gone
        if not fds:
            continue
        if os.fork() == 0:
            code = 0
            try:
                control.close()
                with socket.socket(fileno=fds[0]) as reply:
                    answer(json.loads(message), reply)
            except BaseException:  # the worker sees a reply socket closed with no answer
                code = 1
            os._exit(code)
        os.close(fds[0])


if __name__ == "__main__":
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the forks
    serve(socket.socket(fileno=int(sys.argv[1])))
