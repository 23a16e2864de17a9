"""Which runs the warm path takes, as pure rules: the entrypoints the interpreter started
ahead can run, and where a payload file's copy goes in a prewarmed container."""

from __future__ import annotations

import pytest

from manager.core.groups import PrewarmSettings
from manager.core.runs import RunLimits
from manager.plugins.permissions import PayloadFile
from workers.files import place, takes_payload
from workers.handover import WarmBroken, request_of
from workers.run_spec import PoolConfig
from workers.warm import interpreter

LIMITS = RunLimits(timeout=5, memory_bytes=64 * 2**20, cpu_millis=500, pids=64)


def config(argv: tuple[str, ...] = ("python", "main.py"),
           payload_dirs: tuple[str, ...] = ()) -> PoolConfig:
    return PoolConfig("p", "1.0.0", "sha256:x", "img", argv, "/code", LIMITS,
                      payload_dirs=payload_dirs)


@pytest.mark.parametrize(("argv", "expected"), [
    (("python", "main.py"), "python"),
    (("python3", "app.py", "--verbose"), "python3"),
    (("python3.11", "main.py"), "python3.11"),
    (("python", "-u", "main.py"), None),  # an option changes how the interpreter starts
    (("python3", "-m", "pkg"), None),
    (("python",), None),
    (("node", "main.js"), None),
    (("sh", "-c", "python main.py"), None),
    (("pythonista", "main.py"), None),
])
def test_the_interpreter_started_ahead_runs_plain_python_scripts(argv, expected) -> None:
    assert interpreter(config(argv), PrewarmSettings()) == expected


def test_the_operator_can_turn_it_off() -> None:
    assert interpreter(config(), PrewarmSettings(interpreter=False)) is None


def test_a_payload_copy_goes_into_the_directory_its_path_lies_in() -> None:
    two = config(payload_dirs=("/srv/a", "/srv/b"))
    assert place(two, "/srv/b/x/y.md") == (1, "x/y.md")
    assert place(two, "/srv/a/f.txt") == (0, "f.txt")
    assert place(two, "/srv/ab/f.txt") is None  # a sibling with the same prefix
    assert place(two, "/srv/a") is None


def test_which_payloads_a_prewarmed_container_can_take() -> None:
    files = config(payload_dirs=("/srv/files",))
    assert takes_payload(files, None)
    assert takes_payload(files, PayloadFile("/srv/files/a.md", "/srv/files/a.md", handle=7))
    assert takes_payload(files, PayloadFile("/srv/files/gone.md", "/srv/files/gone.md"))
    assert not takes_payload(files, PayloadFile("/srv/other/a.md", "/srv/other/a.md", 7))
    assert not takes_payload(config(), PayloadFile("/srv/files/a.md", "/srv/files/a.md", 7))
    over_own = config(payload_dirs=("/tmp/files",))  # never mounted over the container's /tmp
    assert not takes_payload(over_own, PayloadFile("/tmp/files/a", "/tmp/files/a", 7))


def test_the_launchers_request_is_its_length_then_nul_separated_fields() -> None:
    """What workers/launcher.c reads: a decimal length and a newline, then the token, the
    argv's length, the argv and the environment; a NUL (which exec could not pass
    either) is refused before anything is sent."""
    sent = request_of("ab" * 16, ("python", "main.py", "--x=ü"), {"A": "1", "B": "x=y"})
    length, _, data = sent.partition(b"\n")
    assert int(length) == len(data)
    assert data.split(b"\0") == [b"ab" * 16, b"3", b"python", b"main.py",
                                 "--x=ü".encode(), b"A=1", b"B=x=y"]
    for argv, env in ((("python", "a\0b"), {}), (("python",), {"K": "v\0EVIL=1"})):
        with pytest.raises(WarmBroken, match="NUL"):
            request_of("t", argv, env)
