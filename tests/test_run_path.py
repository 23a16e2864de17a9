"""Unit tests (pure logic, no services): the pieces of the run path that decide what a
user sees — output capture, the end of a prewarmed run (the launcher's closing line),
the classification of a finished container, and the outcome stored from it."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from manager.core.config import Settings
from manager.core.events import Event
from manager.core.records import Status
from manager.core.runs import RunLimits, RunRequest
from workers.execute import classify
from workers.results import decide
from workers.spec import Capture, PoolConfig, RunResult, RunSpec
from workers.warm import TAIL, Ending, WarmBroken

TOKEN = "ab" * 16
LIMITS = RunLimits(timeout=5, memory_bytes=64 * 2**20, cpu_millis=500, pids=64)


# Capture


def test_capture_keeps_up_to_the_cap_and_says_when_more_came() -> None:
    cap = Capture(10)
    assert cap.add(b"12345") and cap.add(b"67890")
    assert not cap.truncated and cap.value() == b"1234567890"
    assert not cap.add(b"X")
    assert cap.truncated and cap.value() == b"1234567890"
    partial = Capture(4)
    assert not partial.add(b"abcdef")
    assert partial.value() == b"abcd" and partial.truncated


# Ending: the launcher's closing line on a multiplexed attach stream


def frames(*chunks: tuple[int, bytes]) -> socket.socket:
    """A socket whose peer sent these (stream, data) frames, then closed."""
    mine, theirs = socket.socketpair()
    for stream, data in chunks:
        theirs.sendall(struct.pack(">BxxxL", stream, len(data)) + data)
    theirs.close()
    return mine


def end(code: int = 0, oom: int = 0, token: str = TOKEN) -> bytes:
    return f"\x00TITAN-END:{token}:{code}:{oom}\n".encode()


GO = f"\x00TITAN-GO:{TOKEN}\n".encode()


def read(ending: Ending, sock: socket.socket) -> tuple[bytes, bytes]:
    out, err = b"", b""
    for o, e in ending.frames(sock):
        out += o or b""
        err += e or b""
    return out, err


def test_the_closing_line_ends_both_streams_and_is_never_output() -> None:
    ending = Ending(TOKEN)
    sock = frames((1, GO + b'{"topic": "a"}\n'), (2, b"log line\n"), (1, end(3)),
                  (2, end(3)), (1, b"after the end"))
    assert read(ending, sock) == (b'{"topic": "a"}\n', b"log line\n")
    assert ending.state() == {"ExitCode": 3, "OOMKilled": False}


def test_a_closing_line_split_across_frames_is_still_found() -> None:
    line = end(0, 1)
    ending = Ending(TOKEN)
    sock = frames((1, GO[:5]), (1, GO[5:] + b"x" * (TAIL + 5) + line[:7]), (1, line[7:]),
                  (2, line))
    out, err = read(ending, sock)
    assert out == b"x" * (TAIL + 5) and err == b""
    assert ending.state() == {"ExitCode": 0, "OOMKilled": True}


def test_a_forged_closing_line_is_plain_output_and_ends_nothing() -> None:
    forged = end(0, token="cd" * 16)
    ending = Ending(TOKEN)
    out, _ = read(ending, frames((1, GO + forged), (2, forged)))
    assert out == forged and ending.state() is None  # the worker falls back to the engine


def test_streams_that_disagree_give_no_state() -> None:
    ending = Ending(TOKEN)
    read(ending, frames((1, GO + end(0)), (2, end(1))))
    assert ending.state() is None


def test_a_stream_that_ends_before_the_launcher_took_the_run_is_a_broken_warm_start(
        ) -> None:
    """The container died (or was stopped) between the request and the launcher's GO:
    nothing ran, and the run goes cold instead of failing."""
    with pytest.raises(WarmBroken):
        read(Ending(TOKEN), frames((2, b"Killed\n")))
    with pytest.raises(WarmBroken):
        read(Ending(TOKEN), frames((1, GO[:6])))


def test_a_go_line_of_another_run_counts_as_output_of_a_started_run() -> None:
    other = b"\x00TITAN-GO:" + b"cd" * 16 + b"\n"
    ending = Ending(TOKEN)
    out, _ = read(ending, frames((1, other), (1, end(0)), (2, end(0))))
    assert out == other and ending.started

# Classification


def spec() -> RunSpec:
    config = PoolConfig("p", "1.0.0", "sha256:" + "0" * 64, "img", ("python", "main.py"),
                        "/code", LIMITS)
    return RunSpec(config, "inv", "{}", "/e")


@pytest.mark.parametrize(("extra", "state", "code", "status", "reason"), [
    ({"timed_out": True}, {}, 137, Status.TIMEOUT, "timed out after 5s"),
    ({"output_limit": True}, {}, 137, Status.OUTPUT_LIMIT, "stderr exceeded 1024 bytes"),
    ({}, {"OOMKilled": True}, 137, Status.OOM, "out of memory (limit 67108864 bytes)"),
    ({}, {}, 3, Status.FAILED, "exited with code 3: boom"),
    ({}, {}, 143, Status.FAILED, "exited with code 143 (killed by signal 15): boom"),
    ({}, {}, 0, Status.SUCCEEDED, None),
])
def test_classify(extra: dict, state: dict, code: int, status: Status,
                  reason: str | None) -> None:
    result = RunResult(Status.RUNNING, exit_code=code, stderr=b"starting\nboom\n\n",
                       extra=extra)
    classify(result, state, spec(), 1024)
    assert result.status is status
    assert result.reason == reason or (reason and reason in (result.reason or "")), result.reason


def test_a_timeout_wins_over_the_oom_it_caused() -> None:
    result = RunResult(Status.RUNNING, exit_code=137, extra={"timed_out": True})
    classify(result, {"OOMKilled": True}, spec(), 1024)
    assert result.status is Status.TIMEOUT


# decide: a classified result -> what is stored


def request() -> RunRequest:
    return RunRequest("inv1", "p", "1.0.0", "sha256:" + "0" * 64, "img", ("python",), LIMITS,
                      (), 0, None, Event("e1", "t.v1", "go", correlation_id="c1"))


def test_decide_turns_output_into_result_events_with_derived_ids() -> None:
    lines = [{"topic": "t.v1", "event_type": "done", "payload": {"n": n}} for n in (1, 2)]
    result = RunResult(Status.SUCCEEDED, exit_code=0,
                       stdout="\n".join(json.dumps(x) for x in lines).encode())
    decided = decide(request(), result, Settings())
    assert decided.status is Status.SUCCEEDED
    events = [json.loads(e) for e in decided.events]
    assert [e["event_id"] for e in events] == ["inv1-r1", "inv1-r2"]
    assert decided.fields["result_event_ids"] == ["inv1-r1", "inv1-r2"]
    assert all(e["causation_id"] == "e1" and e["correlation_id"] == "c1" and e["hops"] == 1
               and e["source"] == "plugin:p@1.0.0" for e in events)


@pytest.mark.parametrize(("stdout", "says"), [
    (b"not json", "stdout line 1 is not JSON"),
    (b'{"payload": {}}', "lacks topic, event_type"),
    (b'{"topic": "plugins.v1", "event_type": "invocation_failed", "payload": {}}',
     "which only the worker publishes"),
    (b"\xff", "not UTF-8"),
])
def test_decide_fails_a_run_whose_output_breaks_the_contract(stdout: bytes, says: str) -> None:
    decided = decide(request(), RunResult(Status.SUCCEEDED, exit_code=0, stdout=stdout),
                     Settings())
    assert decided.status is Status.FAILED and says in (decided.reason or "")
    assert decided.events == [] and decided.fields["result_event_ids"] == []


def test_decide_keeps_a_failed_runs_status_and_publishes_nothing() -> None:
    result = RunResult(Status.TIMEOUT, reason="timed out after 5s", stdout=b'{"x": 1}')
    decided = decide(request(), result, Settings())
    assert decided.status is Status.TIMEOUT and decided.events == []
