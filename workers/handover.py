"""What passes between a worker and the launcher of a prewarmed container
(workers/launcher.c): the launcher's READY, the run's one request, and on the container's
streams the GO line (with the run's token: the run is taken) and the closing line that
ends both stdout and stderr (the token, the exit status, whether the OOM killer struck)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from manager.core.errors import TitanError
from manager.core.run_end import Exit
from workers.container import STDERR, STDOUT

READY = b"\x00TITAN-READY\n"
TAIL = 160  # bytes held back per stream until it is known they are not the closing line
END_RE = re.compile(rb"\x00TITAN-END:([0-9a-f]{32}):(-?\d+):([01])\n\Z")


class WarmBroken(TitanError):
    """A prewarmed container could not be handed its run (nothing ran): go cold."""

    code = "warm_broken"


def request_of(token: str, argv: tuple[str, ...] | list[str], env: dict[str, str]) -> bytes:
    """The launcher's one request (workers/launcher.c): its length and a newline, then the
    token, the argv's length, the argv and the environment, NUL-separated (no argument
    or environment string can hold a NUL: the kernel's exec could not pass it either)."""
    fields = [token, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    if any("\0" in f for f in fields):
        raise WarmBroken("an argument or environment string holds a NUL")
    data = "\0".join(fields).encode("utf-8", "surrogateescape")
    return b"%d\n" % len(data) + data


class ClosingLine:
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

    def state(self) -> Exit | None:
        """The exit the launcher reported on both streams, or None."""
        if len(self.ends) != 2 or self.ends[STDOUT] != self.ends[STDERR]:
            return None
        code, oom = self.ends[STDOUT]
        return Exit(code, bool(oom))
