"""A plugin run by its interpreter started ahead (workers/zygote.py, in a prewarmed
container) sees what `python main.py` in a cold container shows it: the same stdout,
stderr, exit status and way of ending for exit codes, sys.exit, uncaught and chained
exceptions and their tracebacks, KeyboardInterrupt, syntax errors, signals, buffering,
threads, `__main__` and its globals, coding cookies, a module that shadows the standard
library, a missing script. Both ways run the same spec on a real engine, under runc and
under gVisor; only what the run loop reports is compared."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from manager.core.config import Settings
from manager.core.run_end import RunEnd
from manager.core.runs import RunLimits
from workers.cold import launched_cold
from workers.engine import Engine
from workers.run_loop import follow
from workers.run_spec import PoolConfig, RunSpec
from workers.warm import handed_over, prewarm

pytestmark = pytest.mark.integration
LIMITS = RunLimits(timeout=20, memory_bytes=128 * 2**20, cpu_millis=1000, pids=64)
EVENT = '{"event_id": "e-1", "topic": "t.v1", "event_type": "x", "payload": {"k": 1}}'

PROGRAMS: dict[str, str | bytes] = {
    "main_module": """\
import sys, pickle, __main__, os
class A: pass
print(sorted(globals()), __name__, __file__, __doc__, __package__, __spec__,
      type(__loader__).__name__, type(__builtins__).__name__)
print(sys.argv, sys.orig_argv, sys.path[0], sys.executable, os.getcwd())
print(sys.flags.dont_write_bytecode, sys.flags.isolated, sys.flags.ignore_environment)
print(type(pickle.loads(pickle.dumps(A()))), __main__.A is A, __main__.__dict__ is globals())
print(sys.modules["__main__"] is __main__, os.getpgid(0) == os.getpid())
print(sorted(k for k in os.environ if k != "EVENT_FILE"), os.environ["EVENT_DATA"])
""",
    "exit_code": "import sys\nprint('partial', end='')\nsys.exit(3)\n",
    "exit_message": "import sys\nsys.exit('went wrong')\n",
    "exception": "def f():\n    raise ValueError('boom')\n\nprint('before')\nf()\n",
    "chained": """\
try:
    {}["k"]
except KeyError as e:
    raise RuntimeError("wrapped") from e
""",
    "excepthook": """\
import sys
sys.excepthook = lambda t, v, tb: print("hooked", t.__name__, v, file=sys.stderr)
raise OSError("x")
""",
    "interrupt": """\
import atexit
atexit.register(lambda: print("atexit ran", flush=True))
raise KeyboardInterrupt
""",
    "syntax": "x = (1,\nprint('never'\n",
    "signals": """\
import os, signal, sys
print({s.name: str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM,
       signal.SIGPIPE, signal.SIGHUP, signal.SIGQUIT, signal.SIGXFSZ, signal.SIGUSR1)})
r, w = os.pipe()
os.close(r)
try:
    os.write(w, b"x")
except BrokenPipeError as exc:
    print("EPIPE", exc.errno)
print("terminating", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
""",
    "buffering": """\
import os, sys
print(sys.stdout.line_buffering, sys.stdout.write_through, sys.stdout.encoding,
      sys.stdout.errors, sys.stderr.line_buffering, sys.stdin.read())
sys.stdout.write("a")
sys.stderr.write("b")
os.write(1, b"c")
print("d", end="")
""",
    "threads": """\
import threading, time
def late():
    time.sleep(0.3)
    print("thread done", flush=True)
threading.Thread(target=late).start()
raise RuntimeError("main failed")
""",
    "coding_cookie": b"# -*- coding: latin-1 -*-\nprint('caf\xe9', repr('\xe9'))\n",
}


@dataclass
class Rig:
    engine: Engine
    settings: Settings
    runtime: str | None
    root: Path


@pytest.fixture(scope="module", params=["runc", "gvisor"])
def rig(request, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("zygote")
    mine = settings.with_(cache_dir=root / "cache")
    runtime = mine.gvisor_runtime if request.param == "gvisor" else None
    yield Rig(Engine(mine.engine), mine, runtime, root)
    shutil.rmtree(root, ignore_errors=True)


def code_dir(rig: Rig, name: str, source: str | bytes, **extra: str) -> Path:
    """A plugin directory the run's uid can read (the test's tmp dirs are 0700)."""
    directory = rig.root / "plugins" / name
    directory.mkdir(parents=True, exist_ok=True)
    files = {"main.py": source, **extra}
    for file, text in files.items():
        (directory / file).write_bytes(text if isinstance(text, bytes) else text.encode())
        (directory / file).chmod(0o644)
    for path in (directory, directory.parent):
        path.chmod(0o755)
    return directory


def both(rig: Rig, directory: Path, argv: tuple[str, ...] = ("python", "main.py")
         ) -> tuple[RunEnd, RunEnd]:
    """The same spec run cold (`python main.py` exec'd by docker-init), then handed to a
    prewarmed container's interpreter."""
    config = PoolConfig(directory.name, "1.0.0", f"sha256:{directory.name}",
                        rig.settings.runtime_image, argv, str(directory), LIMITS,
                        runtime=rig.runtime)
    spec = RunSpec(config, f"inv-{directory.name}", EVENT)
    with launched_cold(rig.engine, spec, None, rig.root / "runs") as launched:
        cold = follow(launched, spec, rig.settings.output_cap_bytes, rig.engine)
    warm = prewarm(rig.engine, config)
    try:
        with handed_over(warm, spec, None) as launched:
            hot = follow(launched, spec, rig.settings.output_cap_bytes, rig.engine)
    finally:
        rig.engine.oom.killed(warm.oom)
        assert warm.container.remove()
        rig.engine.identities.give_back(warm.user)
        shutil.rmtree(warm.home, ignore_errors=True)
    assert hot.warm and not cold.warm
    return cold, hot


def seen(end: RunEnd) -> tuple:
    return end.cause, end.exit_code, end.stdout, end.stderr


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_a_plugin_sees_what_python_main_py_shows_it(rig: Rig, name: str) -> None:
    cold, warm = both(rig, code_dir(rig, name, PROGRAMS[name]))
    assert seen(warm) == seen(cold)


def test_the_plugins_own_module_wins_over_a_preloaded_one(rig: Rig) -> None:
    """json is preloaded, unless the plugin's directory has its own: then its `import json`
    finds that one, as it would in a cold container."""
    directory = code_dir(rig, "shadow", "import json\nprint(json.MINE)\n",
                         **{"json.py": "MINE = 'the plugin s own json'\n"})
    cold, warm = both(rig, directory)
    assert seen(warm) == seen(cold)
    assert warm.stdout == b"the plugin s own json\n"


def test_a_missing_script_fails_as_the_interpreter_says(rig: Rig) -> None:
    cold, warm = both(rig, code_dir(rig, "missing", "print('not me')\n"),
                      ("python", "absent.py"))
    assert seen(warm) == seen(cold)
    assert warm.exit_code == 2 and b"can't open file '/plugin/absent.py'" in warm.stderr


def test_the_warm_run_is_the_interpreter_started_ahead(rig: Rig) -> None:
    """What makes the comparisons above mean something: the warm run really was the
    zygote (its command line is the one thing that tells), the cold one an exec."""
    cmdline = "print(open('/proc/self/cmdline').read().split('\\0'))\n"
    cold, warm = both(rig, code_dir(rig, "cmdline", cmdline))
    assert cold.stdout == b"['python', 'main.py', '']\n"
    assert warm.stdout == b"['python', '/titan/zygote.py', '']\n"


def test_threads_select_and_asyncio_work_on_both_runtimes(rig: Rig) -> None:
    """gVisor applies the container's seccomp profile in its own kernel, where the
    engine's default one stops every thread (clone3 refused with EPERM, not ENOSYS) and
    select (pselect6): workers.gvisor_seccomp is what lets a plugin use them."""
    program = """\
import asyncio, os, select, threading
thread = threading.Thread(target=lambda: print("thread", flush=True))
thread.start()
thread.join()
r, w = os.pipe()
os.write(w, b"x")
print("select", select.select([r], [], [], 1)[0] == [r], flush=True)
asyncio.run(asyncio.sleep(0))
print("asyncio")
"""
    cold, warm = both(rig, code_dir(rig, "threads_ok", program))
    for end in (cold, warm):
        assert (end.exit_code, end.stdout, end.stderr) == (
            0, b"thread\nselect True\nasyncio\n", b""), end
