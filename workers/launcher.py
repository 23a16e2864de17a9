"""The launcher that waits inside a prewarmed container (mounted read-only from the host;
the plugin cannot change it). Standard library only; runs as `python3 -I`.

It says it is ready, then blocks on stdin for exactly one run: a JSON line with a
per-run token, the entrypoint and the run's environment. It forks, and the child execs the
plugin exactly as a cold container would (same argv, working directory, environment,
/dev/null on stdin, its own process group, first in line for the OOM killer). The
launcher makes itself non-dumpable (the plugin runs as the same user and must not read the
token from /proc or ptrace it) and a child subreaper. When the plugin exits, whatever it
left running is killed and reaped, as when a cold container stops. Only then does it write
the closing line, with the token, the exit status and whether the OOM killer struck, on
stdout and on stderr, so the worker knows both streams are complete without waiting for
the engine. SIGTERM (the timeout) is passed on to the plugin's process group; SIGINT,
SIGQUIT, SIGHUP and SIGPIPE are ignored (the plugin starts with them as usual).

Started with `--zygote INTERPRETER` (a Python entrypoint), it first starts the plugin's
interpreter (workers/zygote.py) the same way, before it has read anything of a run, and
says it is ready once that interpreter has imported what it preloads; the run's argv and
environment then go to that interpreter instead of to exec. An entrypoint that is not
the one it was started for is exec'd as usual, and the interpreter is killed unused.
"""

import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import sys

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
READY = b"\x00TITAN-READY\n"
LINGER_S = 30  # after the closing line, at most (a worker that died removes nothing)
ZYGOTE = "/titan/zygote.py"
# Ignored while it waits and while it follows the plugin (a signal from outside must not
# end a container that is about to be handed a run); the plugin gets them back as a
# fresh process has them.
IGNORED = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGPIPE)


def prctl(option, value):
    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def oom_kills():
    """The cgroup's OOM-kill count (cgroup v2 memory.events, or v1 memory.oom_control)."""
    for path, key in (("/sys/fs/cgroup/memory.events", "oom_kill"),
                      ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill")):
        try:
            with open(path) as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def start(argv, env, fds=()):
    """Forks the plugin's process and execs `argv` in it, as a container's first process
    would be: its own process group, first for the OOM killer, /dev/null on stdin, default
    signal handling. `fds` (read end, write end) become its fds 3 and 4."""
    pid = os.fork()
    if pid == 0:  # the plugin
        step = "setting up"
        try:
            prctl(PR_SET_DUMPABLE, 1)  # its own /proc files are its own again
            os.setpgid(0, 0)
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write("1000")
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
            for target, fd in enumerate(moved, start=3):
                os.dup2(fd, target)  # inheritable, unlike the pipe's own ends
            for signum in (signal.SIGTERM, *IGNORED):
                signal.signal(signum, signal.SIG_DFL)
            step = argv[0]
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(2, f"{step}: {exc.strerror}\n".encode())
            os._exit(127)
    return pid


class Zygote:
    """The plugin's interpreter, started ahead (workers/zygote.py): its pid and the pipe
    its run goes down."""

    def __init__(self, interpreter, net=False):
        self.interpreter = interpreter
        request_r, self.request_w = os.pipe()
        ready_r, ready_w = os.pipe()
        argv = [interpreter, ZYGOTE, *(["--net"] if net else [])]
        self.pid = start(argv, dict(os.environ), (request_r, ready_w))
        os.close(request_r)
        os.close(ready_w)
        self.ready = os.read(ready_r, 1) == b"R"  # it has preloaded, or it is gone
        os.close(ready_r)

    def hand(self, argv, env):
        """Sends the run: NUL-separated, the argv's length first."""
        data = "\0".join([str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())])
        view = memoryview(data.encode("utf-8", "surrogateescape"))
        while view:
            view = view[os.write(self.request_w, view):]
        os.close(self.request_w)

    def kill(self):
        os.close(self.request_w)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def forward(child):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child, signal.SIGTERM)


def wait_all(child):
    """Waits for the plugin, kills what it left behind, reaps everything; returns the
    plugin's exit status as a container would report it."""
    status = None
    while status is None:
        try:
            pid, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child:
            status = os.waitstatus_to_exitcode(raw)
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)  # every process but this one (PID 1) and its parents
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    if status is None:
        return 1
    return 128 - status if status < 0 else status


def main():
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    # PID 1 ignores signals it has no handler for: a stop before the run ends it at once.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    zygote = None
    if sys.argv[1:2] == ["--zygote"]:
        zygote = Zygote(sys.argv[2], net="--net" in sys.argv[3:])
        if not zygote.ready:
            zygote.kill()
            zygote = None
    os.write(1, READY)
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    run = json.loads(line)
    # The worker knows from this line that the run is taken: a container that ends
    # before it (killed, stopped) never started the plugin, and the run goes cold.
    os.write(1, f"\x00TITAN-GO:{run['token']}\n".encode())
    before = oom_kills()
    env = {**os.environ, **run["env"]}
    if zygote is not None and run["argv"][0] == zygote.interpreter:
        zygote.hand(run["argv"], run["env"])
        child = zygote.pid
    else:
        if zygote is not None:
            zygote.kill()
        child = start(run["argv"], env)
    signal.signal(signal.SIGTERM, lambda *_: forward(child))
    code = wait_all(child)
    oom = int(oom_kills() > before)
    end = f"\x00TITAN-END:{run['token']}:{code}:{oom}\n".encode()
    os.write(1, end)
    os.write(2, end)
    # Nothing of the run is left, but the container stays until the worker removes it:
    # its exit would set the engine tearing it down while the closing line is still on
    # its way out (measured: 2.4 ms later to the worker than any line before it).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    select.select([sys.stdin], [], [], LINGER_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
