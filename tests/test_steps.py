"""A delivery's steps, with the container step played back on a real Redis (no Docker):
the claim (throttled, a duplicate, a second delivery while the holder lives, a
takeover), the manifest's retries and an unusable engine, the slot and hold rules, and
the limits a run gets."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest
import redis
from prometheus_client import REGISTRY

from harness import session_dir, wired
from manager.core.config import Settings
from manager.core.errors import SandboxUnavailable
from manager.core.events import Event
from manager.core.records import InvocationRecord, Status
from manager.core.run_end import End, RunEnd
from manager.core.runs import RunRequest
from manager.core.slots import SlotGrant
from manager.core.wiring import Wiring
from manager.plugins.registry import Registry
from workers.claim import HOLDER_RECHECK_S
from workers.delivery import Delivery
from workers.identity import Identities
from workers.next import Again
from workers.prepare import Prepared
from workers.run_spec import RunSpec


@dataclass
class FakeEngine:
    """What the steps before the container ask of the engine (the identities are real:
    their leases live in the session's own directory)."""

    identities: Identities
    docker_root: str = "/var/lib/docker"


@dataclass
class PlayedBack:
    """The container step (launch and run loop), played back: each call takes the next
    end (or raises it)."""

    ends: list[RunEnd | Exception] = field(default_factory=list)
    specs: list[RunSpec] = field(default_factory=list)

    def __call__(self, prepared: Prepared, *_: object) -> RunEnd:
        self.specs.append(prepared.spec)
        end = self.ends.pop(0)
        if isinstance(end, Exception):
            raise end
        return end


def ok(stdout: bytes = b'{"topic": "t", "event_type": "done", "payload": {}}') -> RunEnd:
    now = time.time()
    return RunEnd(End.EXITED, 0, stdout=stdout, started_wall=now, finished_wall=now + 0.1)


def failed() -> RunEnd:
    now = time.time()
    return RunEnd(End.EXITED, 1, stderr=b"boom\n", started_wall=now, finished_wall=now)


@dataclass
class Rig:
    conn: redis.Redis
    settings: Settings
    wiring: Wiring
    registry: Registry
    played: PlayedBack
    delivery: Delivery

    def request(self, plugin: str) -> RunRequest:
        entry = self.registry.get(plugin)
        req = entry.request(Event(uuid.uuid4().hex, "test.v1", "x"), self.settings.plugin, "api")
        self.wiring.records.create(InvocationRecord.from_request(req, Status.QUEUED), 60)
        return req

    def record(self, req: RunRequest) -> InvocationRecord:
        return self.wiring.records.get(req.invocation_id)

    def events(self, req: RunRequest) -> list[dict]:
        return [e for e in (json.loads(f[b"event"]) for _, f in
                            self.conn.xrange(self.settings.event_stream))
                if e.get("causation_id") == req.event.event_id]


def delivery(wiring: Wiring, played: PlayedBack) -> Delivery:
    uids = wiring.settings.with_(uid_dir=str(session_dir() / "uids"))
    return Delivery(wiring, FakeEngine(Identities(uids.identity)), played)  # type: ignore[arg-type]


@pytest.fixture
def rig(conn, unit_settings) -> Iterator[Rig]:
    settings = unit_settings
    uid = uuid.uuid4().hex[:6]
    mine = settings.with_(key_prefix=f"{settings.key_prefix}r{uid}",
                          event_stream=f"{settings.event_stream}.r{uid}", prewarm_size=0)
    wiring = wired(conn, mine)
    registry = Registry(wiring)
    registry.reload()
    played = PlayedBack()
    yield Rig(conn, mine, wiring, registry, played, delivery(wiring, played))


def test_a_run_succeeds_and_a_second_delivery_is_a_duplicate(rig: Rig) -> None:
    rig.played.ends = [ok()]
    req = rig.request("echo")
    assert rig.delivery.deliver(req, "w1@h").status == "succeeded"
    assert rig.delivery.deliver(req, "w2@h").status == "duplicate"
    record = rig.record(req)
    assert record.attempts == 1 and record.worker == "w1@h" and record.published
    assert [e["event_id"] for e in rig.events(req)] == [f"{req.invocation_id}-r1"]
    assert record.result_event_ids == (f"{req.invocation_id}-r1",)


def test_throttled_runs_wait_without_being_marked_running(rig: Rig) -> None:
    req = rig.request("limited")  # concurrency: 1
    labels = {"plugin": "limited", "reason": "concurrency"}
    before = REGISTRY.get_sample_value("titan_throttle_waits_total", labels) or 0
    assert rig.wiring.slots.acquire("limited", "someone-else", 1, 60) is SlotGrant.GRANTED
    first = rig.delivery.deliver(req, "w@h")
    second = rig.delivery.deliver(req, "w@h")
    assert isinstance(first, Again) and isinstance(second, Again)
    record = rig.record(req)
    assert record.status is Status.THROTTLED and record.attempts == 0 and record.waits == 2
    assert "waiting for a concurrency slot" in record.reason
    assert REGISTRY.get_sample_value("titan_throttle_waits_total", labels) == before + 2
    rig.wiring.slots.release("limited", "someone-else")
    rig.played.ends = [ok()]
    assert rig.delivery.deliver(req, "w@h").status == "succeeded"
    assert rig.record(req).attempts == 1
    assert rig.conn.zcard(rig.wiring.keys.plugin_slots("limited")) == 0


def waiting(rig: Rig) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in rig.conn.hgetall(rig.wiring.keys.waiting).items()}


def test_a_plugin_alone_may_use_every_slot_but_only_its_share_while_others_wait(
        rig: Rig) -> None:
    rig.wiring.slots.renew("w@h", 4)  # a worker's beat: 4 slots
    slots = rig.wiring.slots
    assert [slots.acquire("echo", f"e{n}", None, 60) for n in range(4)] == [SlotGrant.GRANTED] * 4
    for n in range(4):
        slots.release("echo", f"e{n}")
    assert [slots.acquire("echo", f"e{n}", None, 60) for n in range(2)] == [SlotGrant.GRANTED] * 2
    other = rig.request("sleeper")  # queued: another plugin waits now
    assert waiting(rig) == {"sleeper": 1}
    labels = {"plugin": "echo", "reason": "share"}
    before = REGISTRY.get_sample_value("titan_throttle_waits_total", labels) or 0
    mine = rig.request("echo")
    later = rig.delivery.deliver(mine, "w@h")  # echo holds 2 of 4 slots: its share
    assert isinstance(later, Again) and later.countdown == 0  # to the back of the queue
    record = rig.record(mine)
    assert record.status is Status.THROTTLED and "fair share" in record.reason
    assert REGISTRY.get_sample_value("titan_throttle_waits_total", labels) == before + 1
    assert waiting(rig) == {"sleeper": 1}  # a throttled run has had its turn
    rig.played.ends = [ok()]
    assert rig.delivery.deliver(other, "w@h").status == "succeeded"  # the other plugin ran
    assert waiting(rig) == {}
    rig.played.ends = [ok()]
    assert rig.delivery.deliver(mine, "w@h").status == "succeeded"  # nobody else waits
    assert waiting(rig) == {}


def test_a_plugins_weight_scales_its_share(rig: Rig) -> None:
    rig.wiring.slots.renew("w@h", 4)
    rig.request("sleeper")  # another plugin waits
    slots = rig.wiring.slots
    assert [slots.acquire("echo", f"w{n}", None, 60, weight=2) for n in range(5)] == [
        *[SlotGrant.GRANTED] * 4, SlotGrant.SHARE]  # weight 2: twice the half
    assert [slots.acquire("chatty", f"c{n}", None, 60) for n in range(3)] == [
        *[SlotGrant.GRANTED] * 2, SlotGrant.SHARE]  # weight 1: the half


def test_a_slot_lives_while_its_run_is_held_and_frees_itself_after(rig: Rig) -> None:
    """Leases on Redis's clock (TIME), renewed by the process running the run."""
    keys = rig.wiring.keys
    assert rig.wiring.slots.acquire("limited", "run1", 1, 2) is SlotGrant.GRANTED
    rig.wiring.slots.hold("limited", "run1", "w@h", take=True)
    (seconds, micros) = rig.conn.time()
    redis_now = seconds + micros / 1e6
    assert rig.conn.zscore(keys.plugin_slots("limited"), "run1") > redis_now + 20  # renewed
    assert rig.wiring.slots.holder("run1") == "w@h"
    assert rig.wiring.slots.acquire("limited", "run2", 1) is SlotGrant.CONCURRENCY
    rig.conn.zadd(keys.plugin_slots("limited"), {"run1": redis_now - 1})  # no renewals now
    assert rig.wiring.slots.acquire("limited", "run2", 1) is SlotGrant.GRANTED
    rig.wiring.slots.let_go("limited", "run1")
    assert rig.wiring.slots.holder("run1") is None
    rig.wiring.slots.hold("limited", "run1", "w@h")  # a late renewal revives nothing
    assert rig.wiring.slots.holder("run1") is None
    assert rig.conn.zscore(keys.plugin_slots("limited"), "run1") is None


def test_the_share_never_raises_a_manifest_cap(rig: Rig) -> None:
    rig.wiring.slots.renew("w@h", 8)
    assert rig.wiring.slots.acquire("limited", "one", 1, 60) is SlotGrant.GRANTED
    assert rig.wiring.slots.acquire("limited", "two", 1, 60) is SlotGrant.CONCURRENCY
    rig.request("sleeper")
    assert rig.wiring.slots.acquire("limited", "two", 1, 60) is SlotGrant.CONCURRENCY


def test_an_engine_away_is_waited_out_then_fails_visibly(rig: Rig) -> None:
    """Tries that found the engine away count time, not attempts: the run fails only once
    the engine has been away TITAN_SANDBOX_PATIENCE_S since its first such try."""
    req = rig.request("echo")
    rig.played.ends = [SandboxUnavailable("engine away")] * 4
    since = 0.0
    for waits in (1, 2, 3):
        later = rig.delivery.deliver(req, "w@h")
        assert isinstance(later, Again) and later.request.engine_waits == waits
        assert later.countdown <= 5  # an engine is looked at again soon, whatever the count
        since = since or later.request.engine_away_since
        assert later.request.engine_away_since == since > 0
        record = rig.record(req)
        assert record.status is Status.RETRYING and record.reason == \
            "sandbox_unavailable: engine away"
        req = later.request
    away = replace(req, engine_away_since=since - rig.settings.sandbox_patience_s)
    assert rig.delivery.deliver(away, "w@h").status == "failed"
    (failure,) = rig.events(req)
    assert failure["payload"]["reason"].startswith("sandbox_unavailable: engine away (away for ")
    assert failure["payload"]["reason"].endswith(" s, TITAN_SANDBOX_PATIENCE_S)")


def test_waiting_for_the_engine_spends_none_of_the_manifests_retries(rig: Rig) -> None:
    req = rig.request("flaky")  # retries: 2
    rig.played.ends = [SandboxUnavailable("engine away")] * 3 + [failed(), failed(), ok()]
    outcomes = []
    while isinstance(later := rig.delivery.deliver(req, "w@h"), Again):
        outcomes.append(rig.record(req).reason.split(":")[0])
        req = later.request
    assert later.status == "succeeded", outcomes
    assert outcomes == ["sandbox_unavailable"] * 3 + ["failed"] * 2
    assert rig.record(req).attempts == 6


def test_plugin_failures_are_retried_only_as_the_manifest_says(rig: Rig) -> None:
    req = rig.request("flaky")  # retries: 2
    rig.played.ends = [failed(), failed(), failed()]
    outcome = rig.delivery.deliver(req, "w@h")
    while isinstance(outcome, Again):
        assert rig.record(req).status is Status.RETRYING
        outcome = rig.delivery.deliver(outcome.request, "w@h")
    assert outcome.status == "failed" and rig.record(req).attempts == 3
    assert len(rig.events(req)) == 1  # one failure event, at the end
    req = rig.request("failing")  # no retries
    rig.played.ends = [failed()]
    assert rig.delivery.deliver(req, "w@h").status == "failed" and rig.record(req).attempts == 1


def test_a_second_delivery_waits_while_the_holder_lives_then_takes_over(rig: Rig) -> None:
    req = rig.request("echo")
    records = rig.wiring.records
    assert records.transition(req.invocation_id, Status.RUNNING, increment="attempts",
                              worker="holder@h").applied
    rig.wiring.slots.hold("echo", req.invocation_id, "holder@h", take=True)  # it runs
    later = rig.delivery.deliver(req, "second@h")
    assert isinstance(later, Again) and later.countdown == HOLDER_RECHECK_S
    assert rig.played.specs == []
    rig.conn.delete(rig.wiring.keys.lease(req.invocation_id))  # the holder died
    rig.played.ends = [ok()]
    assert rig.delivery.deliver(req, "second@h").status == "succeeded"
    record = rig.record(req)
    assert record.worker == "second@h" and record.attempts == 2


def test_the_run_gets_the_requests_limits_clamped_by_this_worker(rig: Rig) -> None:
    req = rig.request("probe")  # asks for 96Mi and 20 s
    strict = rig.settings.with_(max_memory_bytes=32 * 1024**2, max_timeout=3)
    rig.played.ends = [ok()]
    delivery(wired(rig.conn, strict), rig.played).deliver(req, "w@h")
    (spec,) = rig.played.specs
    assert spec.limits.memory_bytes == 32 * 1024**2 and spec.limits.timeout == 3


def test_a_summary_says_what_operators_look_for_in_flower() -> None:
    """Flower shows the task's result (or failure): a run's status, time and path, then
    what it published, or its reason and the end of the plugin's stderr."""
    from manager.core.records import Outcome
    from workers.next import SHOWN_RESULTS, STDERR_TAIL, summarize

    results = [{"event_id": f"i-r{n}", "topic": "chat.v1", "event_type": "counted",
                "payload": f'{{"n": {n}}}'} for n in range(1, 6)]
    good = summarize(Outcome(Status.SUCCEEDED, None,
                             ran=RunEnd(End.EXITED, 0, finished_wall=0.042, warm=True),
                             results=tuple(results)))
    lines = good.splitlines()
    assert lines[0] == "succeeded in 0.042s (warm): 5 result event(s)"
    assert lines[1:1 + SHOWN_RESULTS] == [f'-> chat.v1/counted {{"n": {n}}}'
                                          for n in range(1, 1 + SHOWN_RESULTS)]
    assert lines[-1] == "... and 2 more"
    # the last lines that fit, each whole: never a line cut mid-word
    last = "Traceback (most recent call last):\n" + "  frame\n" * 30 + "KeyError: 'text'\n"
    stderr = "x" * (STDERR_TAIL - len(last) + 10) + "\n" + last
    bad = summarize(Outcome(Status.FAILED, "exited with code 1: KeyError: 'text'",
                            ran=RunEnd(End.EXITED, 1, stderr=stderr.encode(),
                                       finished_wall=0.3)))
    head, tail = bad.split("\nstderr (its last lines):\n")
    assert head == "failed in 0.3s (cold): exited with code 1: KeyError: 'text'"
    assert tail == last.rstrip()
    short = summarize(Outcome(Status.FAILED, "x", ran=RunEnd(End.EXITED, 1, stderr=b"oops\n")))
    assert short.endswith("\nstderr:\noops")
    refused = summarize(Outcome(Status.REJECTED, "path outside the plugin's permissions"))
    assert refused == "rejected: path outside the plugin's permissions"
