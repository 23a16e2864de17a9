"""The plugin's interpreter, started before its event (mounted read-only into a prewarmed
container; standard library only). The launcher (workers/launcher.c) starts it, as the
container's user and with the container's environment, before it has read anything of a
run: so no run's data ever reaches it but its own.

Started as `python /titan/zygote.py` (the plugin's own interpreter name, so
`sys.executable` and the flags the environment sets are those of `python main.py`), it
imports standard library modules plugins commonly use, says so on fd 4, and waits on
fd 3 for its one run: the argv and the run's environment. Then it becomes
`python main.py` as far as the plugin can tell: the environment, `sys.argv`,
`sys.orig_argv` and `sys.path[0]` as the interpreter would have set them, a fresh
`__main__` module with the globals a script gets, the script compiled from its bytes
(its coding cookie honoured), an uncaught exception printed by `sys.excepthook` from the
plugin's first frame, exit status 1, KeyboardInterrupt ending the process by SIGINT after
the usual shutdown, SystemExit handled by the interpreter itself. Anything it would not
run exactly as the interpreter does (a missing file, a directory, a zip, a .pyc) is
handed to the interpreter by exec, as a cold container would run it.

Nothing is preloaded when the plugin's directory or its requirements provide a module
with a standard library name: the plugin's `import` must find its own.
"""

import atexit
import gc
import os
import stat
import sys

# Only modules the interpreter has loaded at start (or built into it) are imported before
# it is known that nothing of the plugin's shadows the standard library.
REQUEST_FD = 3
READY_FD = 4
CODE_DIR = "/plugin"
# Imported ahead: common in plugins, light (each costs every idle container its memory:
# hashlib's OpenSSL, argparse and dataclasses' inspect, over 1 MiB each, are left to the
# plugin), and with no state taken from the time of import that a plugin could observe
# (logging is left out: it records its start time).
PRELOAD = (
    "base64", "collections", "contextlib", "copy", "csv", "datetime", "enum", "fnmatch",
    "functools", "glob", "heapq", "io", "itertools", "json", "math", "operator", "pathlib",
    "platform", "random", "re", "shlex", "shutil", "signal", "string", "struct",
    "subprocess", "tempfile", "textwrap", "threading", "time", "traceback", "typing",
    "urllib.parse", "uuid", "zlib",
)
# And for a plugin with a net grant (`--net`): the HTTP client it came for (the import
# of urllib.request with http.client and ssl took 64 ms of a 95 ms warm run).
NET_PRELOAD = ("http.client", "ssl", "urllib.request")
ZIP_MAGIC = b"PK\x03\x04"
LOADER = type(__loader__)  # this script's: the SourceFileLoader any script gets
MODULE = type(sys)


def shadowed(directories):
    """Standard library names that a module in one of `directories` would shadow."""
    names = set()
    for directory in directories:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        names.update(entry.split(".", 1)[0] for entry in entries)
    return names & set(sys.stdlib_module_names)


def preload(extra=()):
    """Imports PRELOAD (and `extra`); False (nothing imported) when the plugin's own
    directory or anything on PYTHONPATH would shadow a standard library name."""
    path = os.environ.get("PYTHONPATH", "")
    if shadowed([CODE_DIR, *(p for p in path.split(os.pathsep) if p)]):
        return False
    for name in (*PRELOAD, *extra):
        try:
            __import__(name)
        except Exception:  # absent or broken: the plugin finds out itself
            continue
    # What is loaded now lives as long as the process: out of the collector's way, so
    # neither the plugin's collections nor the interpreter's shutdown walk it again
    # (the shutdown of a plain start costs about 2 ms, with the preload 6 ms, frozen 2.7).
    gc.freeze()
    return True


def read_request():
    """(argv, env) from the launcher: NUL-separated, the argv's length first (neither an
    argument nor an environment string can hold a NUL); None if it sent nothing."""
    chunks = []
    while chunk := os.read(REQUEST_FD, 1 << 16):
        chunks.append(chunk)
    os.close(REQUEST_FD)
    if not chunks:
        return None
    fields = b"".join(chunks).decode("utf-8", "surrogateescape").split("\0")
    count = int(fields[0])
    argv, env = fields[1:1 + count], fields[1 + count:]
    return argv, dict(item.split("=", 1) for item in env)


def source_of(path):
    """The script's bytes, or None when the interpreter should run it itself (absent,
    unreadable, not a plain source file)."""
    if path.endswith((".pyc", ".pyo")):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if data.startswith(ZIP_MAGIC) else data


def main_module(path):
    """A fresh __main__, with the globals `python main.py` gives a script."""
    module = MODULE("__main__")
    module.__loader__ = LOADER("__main__", path)
    module.__dict__.update(__annotations__={}, __builtins__=__builtins__, __file__=path,
                           __cached__=None)
    sys.modules["__main__"] = module
    return module


class Ending:
    """How the interpreter ends after an uncaught exception: exit status 1, or for a
    KeyboardInterrupt death by SIGINT once it has shut down (registered before the plugin
    runs, so after the plugin's own atexit handlers)."""

    interrupted = False

    @classmethod
    def at_exit(cls):
        if cls.interrupted:
            import signal

            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)


def report(exc):
    """Prints an uncaught exception as the interpreter does: through sys.excepthook, from
    the plugin's first frame."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ else None
    exc.__traceback__ = tb  # the hook prints the exception's own traceback
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    try:
        sys.excepthook(type(exc), exc, tb)
    except BaseException as hook_exc:  # the interpreter's words for it
        print("Error in sys.excepthook:", file=sys.stderr)
        sys.__excepthook__(type(hook_exc), hook_exc, hook_exc.__traceback__)
        print("\nOriginal exception was:", file=sys.stderr)
        sys.__excepthook__(type(exc), exc, tb)


def run(argv, env, preloaded):
    os.environ.update(env)
    path = os.path.abspath(argv[1])
    source = source_of(path) if preloaded else None
    if source is None:
        os.execvp(argv[0], argv)
    sys.argv = list(argv[1:])
    sys.orig_argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.realpath(path)))
    module = main_module(path)
    atexit.register(Ending.at_exit)
    try:
        code = compile(source, path, "exec", dont_inherit=True)
        del source
        exec(code, module.__dict__)
    except SystemExit:
        raise  # the interpreter reports it, as for any script
    except BaseException as exc:  # reported as the interpreter would
        Ending.interrupted = isinstance(exc, KeyboardInterrupt)
        report(exc)
        return 1
    return 0


def serve():
    del sys.path[0]  # this file's directory: never the plugin's
    preloaded = preload(NET_PRELOAD if "--net" in sys.argv[1:] else ())
    os.write(READY_FD, b"R")
    os.close(READY_FD)
    request = read_request()
    if request is None:
        return 0
    argv, env = request
    return run(argv, env, preloaded)


if __name__ == "__main__":
    if serve():
        sys.exit(1)
