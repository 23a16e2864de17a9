"""The Runner's branches, driven with a fake Sandbox on a real Redis (no Docker): throttled,
engine unavailable, the manifest's retries, duplicate and second deliveries, takeover."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from prometheus_client import REGISTRY

from harness import session_dir
from manager.core.beats import WorkerBeat
from manager.core.config import Settings
from manager.core.errors import SandboxUnavailable
from manager.core.events import Event
from manager.core.records import InvocationRecord, Status
from manager.core.runs import RunRequest
from manager.core.slots import Grant
from manager.plugins.registry import Registry
from workers.identity import Identities
from workers.runner import HOLDER_RECHECK_S, Later, Runner
from workers.spec import RunResult, RunSpec


@dataclass
class FakeSandbox:
    """Plays back outcomes instead of running containers (the identities are real: their
    leases live in the session's own directory)."""

    identities: Identities
    outcomes: list[RunResult | Exception] = field(default_factory=list)
    specs: list[RunSpec] = field(default_factory=list)
    docker_root: str = "/var/lib/docker"

    def run(self, spec: RunSpec) -> RunResult:
        self.specs.append(spec)
        self.identities.give_back(spec.user)  # its container is gone with its outcome
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def ok(stdout: bytes = b'{"topic": "t", "event_type": "done", "payload": {}}') -> RunResult:
    now = time.time()
    return RunResult(Status.SUCCEEDED, exit_code=0, stdout=stdout, started_at=now,
                     finished_at=now + 0.1)


def failed() -> RunResult:
    now = time.time()
    return RunResult(Status.FAILED, reason="exited with code 1", exit_code=1, started_at=now,
                     finished_at=now)


@dataclass
class Rig:
    conn: redis.Redis
    settings: Settings
    registry: Registry
    sandbox: FakeSandbox
    runner: Runner

    def request(self, plugin: str) -> RunRequest:
        entry = self.registry.get(plugin)
        req = entry.request(Event(uuid.uuid4().hex, "test.v1", "x"), self.settings, "api")
        self.runner.records.create(InvocationRecord.from_request(req, Status.QUEUED),
                                   time.time() + 60)
        return req

    def record(self, req: RunRequest) -> InvocationRecord:
        return self.runner.records.get(req.invocation_id)

    def events(self, req: RunRequest) -> list[dict]:
        return [e for e in (json.loads(f[b"event"]) for _, f in
                            self.conn.xrange(self.settings.event_stream))
                if e.get("causation_id") == req.event.event_id]


@pytest.fixture
def rig(conn, unit_settings) -> Iterator[Rig]:
    settings = unit_settings
    uid = uuid.uuid4().hex[:6]
    mine = settings.with_(key_prefix=f"{settings.key_prefix}r{uid}",
                          event_stream=f"{settings.event_stream}.r{uid}", sandbox_retries=2,
                          prewarm_size=0)
    registry = Registry(conn, mine)
    registry.reload()
    sandbox = FakeSandbox(Identities(mine.with_(uid_dir=str(session_dir() / "uids"))))
    yield Rig(conn, mine, registry, sandbox, Runner(conn, mine, sandbox))  # type: ignore[arg-type]


def test_a_run_succeeds_and_a_second_delivery_is_a_duplicate(rig: Rig) -> None:
    rig.sandbox.outcomes = [ok()]
    req = rig.request("echo")
    assert rig.runner.execute(req, "w1@h").status == "succeeded"
    assert rig.runner.execute(req, "w2@h").status == "duplicate"
    record = rig.record(req)
    assert record.attempts == 1 and record.worker == "w1@h" and record.published
    assert [e["event_id"] for e in rig.events(req)] == [f"{req.invocation_id}-r1"]
    assert record.result_event_ids == (f"{req.invocation_id}-r1",)


def test_throttled_runs_wait_without_being_marked_running(rig: Rig) -> None:
    req = rig.request("limited")  # concurrency: 1
    labels = {"plugin": "limited", "reason": "concurrency"}
    before = REGISTRY.get_sample_value("titan_throttle_waits_total", labels) or 0
    assert rig.runner.slots.acquire("limited", "someone-else", 1, 60) is Grant.GRANTED
    first = rig.runner.execute(req, "w@h")
    second = rig.runner.execute(req, "w@h")
    assert isinstance(first, Later) and isinstance(second, Later)
    record = rig.record(req)
    assert record.status is Status.THROTTLED and record.attempts == 0 and record.waits == 2
    assert "waiting for a concurrency slot" in record.reason
    assert REGISTRY.get_sample_value("titan_throttle_waits_total", labels) == before + 2
    rig.runner.slots.release("limited", "someone-else")
    rig.sandbox.outcomes = [ok()]
    assert rig.runner.execute(req, "w@h").status == "succeeded"
    assert rig.record(req).attempts == 1
    assert rig.conn.zcard(rig.runner.keys.plugin_slots("limited")) == 0


def waiting(rig: Rig) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in rig.conn.hgetall(rig.runner.keys.waiting).items()}


def test_a_plugin_alone_may_use_every_slot_but_only_its_share_while_others_wait(
        rig: Rig) -> None:
    WorkerBeat("w@h", 1, True, slots=4).save(rig.conn, rig.runner.keys)
    slots = rig.runner.slots
    assert [slots.acquire("echo", f"e{n}", None, 60) for n in range(4)] == [Grant.GRANTED] * 4
    for n in range(4):
        slots.release("echo", f"e{n}")
    assert [slots.acquire("echo", f"e{n}", None, 60) for n in range(2)] == [Grant.GRANTED] * 2
    other = rig.request("sleeper")  # queued: another plugin waits now
    assert waiting(rig) == {"sleeper": 1}
    labels = {"plugin": "echo", "reason": "share"}
    before = REGISTRY.get_sample_value("titan_throttle_waits_total", labels) or 0
    mine = rig.request("echo")
    later = rig.runner.execute(mine, "w@h")  # echo holds 2 of 4 slots: its share
    assert isinstance(later, Later) and later.countdown == 0  # to the back of the queue
    record = rig.record(mine)
    assert record.status is Status.THROTTLED and "fair share" in record.reason
    assert REGISTRY.get_sample_value("titan_throttle_waits_total", labels) == before + 1
    assert waiting(rig) == {"sleeper": 1}  # a throttled run has had its turn
    rig.sandbox.outcomes = [ok()]
    assert rig.runner.execute(other, "w@h").status == "succeeded"  # the other plugin ran
    assert waiting(rig) == {}
    rig.sandbox.outcomes = [ok()]
    assert rig.runner.execute(mine, "w@h").status == "succeeded"  # nobody else waits
    assert waiting(rig) == {}


def test_a_slot_lives_while_its_worker_beats_and_frees_itself_after(rig: Rig) -> None:
    keys = rig.runner.keys
    assert rig.runner.slots.acquire("limited", "run1", 1, 2) is Grant.GRANTED
    WorkerBeat("w@h", 1, True, slots=1).save(rig.conn, keys, active={"run1": "limited"})
    assert rig.conn.zscore(keys.plugin_slots("limited"), "run1") > time.time() + 20  # renewed
    assert rig.runner.slots.acquire("limited", "run2", 1) is Grant.CONCURRENCY
    rig.conn.zadd(keys.plugin_slots("limited"), {"run1": time.time() - 1})  # beats stopped
    assert rig.runner.slots.acquire("limited", "run2", 1) is Grant.GRANTED


def test_the_share_never_raises_a_manifest_cap(rig: Rig) -> None:
    WorkerBeat("w@h", 1, True, slots=8).save(rig.conn, rig.runner.keys)
    assert rig.runner.slots.acquire("limited", "one", 1, 60) is Grant.GRANTED
    assert rig.runner.slots.acquire("limited", "two", 1, 60) is Grant.CONCURRENCY
    rig.request("sleeper")
    assert rig.runner.slots.acquire("limited", "two", 1, 60) is Grant.CONCURRENCY


def test_an_unusable_engine_is_retried_then_fails_visibly(rig: Rig) -> None:
    req = rig.request("echo")
    rig.sandbox.outcomes = [SandboxUnavailable("engine away")] * 3
    for attempt in (1, 2):
        later = rig.runner.execute(req, "w@h")
        assert isinstance(later, Later) and later.request.attempt == attempt + 1
        record = rig.record(req)
        assert record.status is Status.RETRYING and record.attempts == attempt
        assert record.reason == "sandbox_unavailable: engine away"
        req = later.request
    assert rig.runner.execute(req, "w@h").status == "failed"  # sandbox_retries: 2
    (failure,) = rig.events(req)
    assert failure["payload"]["reason"] == "sandbox_unavailable: engine away"
    assert rig.record(req).attempts == 3


def test_plugin_failures_are_retried_only_as_the_manifest_says(rig: Rig) -> None:
    req = rig.request("flaky")  # retries: 2
    rig.sandbox.outcomes = [failed(), failed(), failed()]
    outcome = rig.runner.execute(req, "w@h")
    while isinstance(outcome, Later):
        assert rig.record(req).status is Status.RETRYING
        outcome = rig.runner.execute(outcome.request, "w@h")
    assert outcome.status == "failed" and rig.record(req).attempts == 3
    assert len(rig.events(req)) == 1  # one failure event, at the end
    req = rig.request("failing")  # no retries
    rig.sandbox.outcomes = [failed()]
    assert rig.runner.execute(req, "w@h").status == "failed" and rig.record(req).attempts == 1


def test_a_second_delivery_waits_while_the_holder_lives_then_takes_over(rig: Rig) -> None:
    req = rig.request("echo")
    records = rig.runner.records
    assert records.transition(req.invocation_id, Status.RUNNING, increment="attempts",
                              worker="holder@h").applied
    beat = WorkerBeat("holder@h", 1, True, held=(req.invocation_id,))
    beat.save(rig.conn, rig.runner.keys)
    later = rig.runner.execute(req, "second@h")
    assert isinstance(later, Later) and later.countdown == HOLDER_RECHECK_S
    assert rig.sandbox.specs == []
    beat.remove(rig.conn, rig.runner.keys)  # the holder died
    rig.sandbox.outcomes = [ok()]
    assert rig.runner.execute(req, "second@h").status == "succeeded"
    record = rig.record(req)
    assert record.worker == "second@h" and record.attempts == 2


def test_the_run_gets_the_requests_limits_clamped_by_this_worker(rig: Rig) -> None:
    req = rig.request("probe")  # asks for 96Mi and 20 s
    strict = rig.settings.with_(max_memory_bytes=32 * 1024**2, max_timeout=3)
    rig.sandbox.outcomes = [ok()]
    Runner(rig.conn, strict, rig.sandbox).execute(req, "w@h")  # type: ignore[arg-type]
    (spec,) = rig.sandbox.specs
    assert spec.limits.memory_bytes == 32 * 1024**2 and spec.limits.timeout == 3
