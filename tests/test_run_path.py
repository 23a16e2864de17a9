"""Unit tests (pure logic, no services): the pieces of the run path that decide what a
user sees: output capture, the end of a prewarmed run (the launcher's GO and closing
lines), the verdict on every cause of a run's end on every lane, and the Outcome stored."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from manager.core.events import Event
from manager.core.records import Status
from manager.core.run_end import End, Exit, RunEnd
from manager.core.run_groups import OutputSettings
from manager.core.runs import RunLimits, RunRequest
from workers.classify import Verdict, conclude, verdict
from workers.handover import TAIL, ClosingLine, WarmBroken
from workers.run_spec import Capture, PoolConfig, RunSpec

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


# ClosingLine: the launcher's closing line on a multiplexed attach stream


def frames(*chunks: tuple[int, bytes]) -> Iterator[tuple[int, bytes]]:
    """The (stream, payload) frames a container's attach stream gave, then its end."""
    return iter(chunks)


def end(code: int = 0, oom: int = 0, token: str = TOKEN) -> bytes:
    return f"\x00TITAN-END:{token}:{code}:{oom}\n".encode()


GO = f"\x00TITAN-GO:{TOKEN}\n".encode()


def read(ending: ClosingLine, chunks: Iterator[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    out, err = b"", b""
    for stream, data in ending.frames(chunks):
        if stream == 1:
            out += data
        else:
            err += data
    return out, err


def test_the_closing_line_ends_both_streams_and_is_never_output() -> None:
    ending = ClosingLine(TOKEN)
    sock = frames((1, GO + b'{"topic": "a"}\n'), (2, b"log line\n"), (1, end(3)),
                  (2, end(3)), (1, b"after the end"))
    assert read(ending, sock) == (b'{"topic": "a"}\n', b"log line\n")
    assert ending.state() == Exit(3)


def test_a_closing_line_split_across_frames_is_still_found() -> None:
    line = end(0, 1)
    ending = ClosingLine(TOKEN)
    sock = frames((1, GO[:5]), (1, GO[5:] + b"x" * (TAIL + 5) + line[:7]), (1, line[7:]),
                  (2, line))
    out, err = read(ending, sock)
    assert out == b"x" * (TAIL + 5) and err == b""
    assert ending.state() == Exit(0, oom_killed=True)


def test_a_forged_closing_line_is_plain_output_and_ends_nothing() -> None:
    forged = end(0, token="cd" * 16)
    ending = ClosingLine(TOKEN)
    out, _ = read(ending, frames((1, GO + forged), (2, forged)))
    assert out == forged and ending.state() is None  # the worker falls back to the engine


def test_streams_that_disagree_give_no_state() -> None:
    ending = ClosingLine(TOKEN)
    read(ending, frames((1, GO + end(0)), (2, end(1))))
    assert ending.state() is None


def test_a_stream_that_ends_before_the_launcher_took_the_run_is_a_broken_warm_start(
        ) -> None:
    """The container died (or was stopped) between the request and the launcher's GO:
    nothing ran, and the run goes cold instead of failing."""
    with pytest.raises(WarmBroken):
        read(ClosingLine(TOKEN), frames((2, b"Killed\n")))
    with pytest.raises(WarmBroken):
        read(ClosingLine(TOKEN), frames((1, GO[:6])))


def test_a_go_line_of_another_run_counts_as_output_of_a_started_run() -> None:
    other = b"\x00TITAN-GO:" + b"cd" * 16 + b"\n"
    ending = ClosingLine(TOKEN)
    out, _ = read(ending, frames((1, other), (1, end(0)), (2, end(0))))
    assert out == other and ending.started

# Classification


def spec() -> RunSpec:
    config = PoolConfig("p", "1.0.0", "sha256:" + "0" * 64, "img", ("python", "main.py"),
                        "/code", LIMITS)
    return RunSpec(config, "inv", "{}", "/e")


LANES = ["runc-cold", "runc-warm", "gvisor-cold", "gvisor-warm"]
CAUSES = [  # every cause of a run's end, with what a person is told
    (End.TIMED_OUT, 137, b"", Status.TIMEOUT, "timed out after 5s"),
    (End.OUTPUT_CAP, 137, b"x" * 1024, Status.OUTPUT_LIMIT, "stderr exceeded 1024 bytes"),
    (End.OOM, 137, b"", Status.OOM, "killed: out of memory (limit 67108864 bytes)"),
    (End.STOPPED, 143, b"", Status.RETRYING,
     "the container was stopped from outside this worker (an engine shutdown or a docker "
     "stop)"),
    (End.EXITED, 3, b"", Status.FAILED, "exited with code 3: boom"),
    (End.EXITED, 137, b"", Status.FAILED, "exited with code 137 (killed by signal 9): boom"),
    (End.EXITED, 0, b"", Status.SUCCEEDED, None),
]


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize(("cause", "code", "stdout", "status", "reason"), CAUSES)
def test_the_verdict_on_every_cause_on_every_lane(lane: str, cause: End, code: int,
                                                  stdout: bytes, status: Status,
                                                  reason: str | None) -> None:
    """The same end means the same on every lane: classification is pure and sees only
    the RunEnd (the lane is what the run loop read it from)."""
    end = RunEnd(cause, code, stdout, b"starting\nboom\n\n", False,
                 cause is End.OUTPUT_CAP, warm=lane.endswith("warm"))
    assert verdict(end, spec(), 1024) == Verdict(status, reason)


# outcome: a verdict and what the plugin wrote -> what is stored


def request() -> RunRequest:
    return RunRequest("inv1", "p", "1.0.0", "sha256:" + "0" * 64, "img", ("python",), LIMITS,
                      (), 0, None, Event("e1", "t.v1", "go", correlation_id="c1"))


def ended(stdout: bytes, code: int = 0) -> RunEnd:
    return RunEnd(End.EXITED, code, stdout, started_wall=100.0, finished_wall=100.5,
                  ready_s=0.01, container_id="c0ffee", warm=True)


def test_output_becomes_result_events_with_derived_ids() -> None:
    lines = [{"topic": "t.v1", "event_type": "done", "payload": {"n": n}} for n in (1, 2)]
    end = ended("\n".join(json.dumps(x) for x in lines).encode())
    stored = conclude(request(), end, verdict(end, spec(), 1024), OutputSettings())
    assert stored.status is Status.SUCCEEDED
    events = [json.loads(e) for e in stored.events]
    assert [e["event_id"] for e in events] == ["inv1-r1", "inv1-r2"]
    assert stored.result_event_ids == ("inv1-r1", "inv1-r2")
    fields = stored.record_fields()
    assert fields["result_event_ids"] == ["inv1-r1", "inv1-r2"]
    assert fields["warm"] is True and fields["duration_s"] == 0.5 and fields["exit_code"] == 0
    assert all(e["causation_id"] == "e1" and e["correlation_id"] == "c1" and e["hops"] == 1
               and e["source"] == "plugin:p@1.0.0" for e in events)


@pytest.mark.parametrize(("stdout", "says"), [
    (b"not json", "stdout line 1 is not JSON"),
    (b'{"payload": {}}', "lacks topic, event_type"),
    (b'{"topic": "plugins.v1", "event_type": "invocation_failed", "payload": {}}',
     "which is reserved for the manager's own events"),
    (b"\xff", "not UTF-8"),
])
def test_output_that_breaks_the_contract_fails_the_run(stdout: bytes, says: str) -> None:
    end = ended(stdout)
    stored = conclude(request(), end, verdict(end, spec(), 1024), OutputSettings())
    assert stored.status is Status.FAILED and says in (stored.reason or "")
    assert stored.events == () and stored.record_fields()["result_event_ids"] == []


def test_a_run_that_did_not_succeed_publishes_nothing_it_printed() -> None:
    end = RunEnd(End.TIMED_OUT, 137, b'{"topic": "t", "event_type": "e", "payload": {}}')
    stored = conclude(request(), end, verdict(end, spec(), 1024), OutputSettings())
    assert stored.status is Status.TIMEOUT and stored.events == ()
