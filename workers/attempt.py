"""One attempt of a run: the same steps for a worker's delivery (workers.delivery) and the
CLI's local run (manager.cli.local). Prepare (workers.prepare); what the run is given,
its egress grant and secrets (workers.given; a local run is given none); execute, the
launch and the run loop (workers.execute); and the verdict (workers.classify). What
follows (storing the end, a retry, a report) is the caller's."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from manager.core.config import Settings
from manager.core.errors import ContainerRefused, SandboxUnavailable
from manager.core.records import Outcome, Status
from manager.core.run_end import RunEnd
from manager.core.run_groups import OutputSettings
from manager.core.runs import RunRequest
from manager.core.secrets import SecretError
from workers.classify import Verdict, conclude, verdict
from workers.engine import Engine
from workers.execute import run_container
from workers.given import Gate, Given
from workers.plugin_cache import PluginCache
from workers.pool import WarmPool
from workers.prepare import prepare
from workers.run_spec import RunSpec

Execute = Callable[..., RunEnd]  # workers.execute.run_container's signature


@dataclass(frozen=True)
class Unavailable:
    """The engine (or the egress proxy) could not be used, or it stopped the container:
    the run did not end by itself; a delivery tries it again later."""

    why: str


@dataclass(frozen=True)
class Ran:
    """A container ran the plugin to an end of its own (the verdict is terminal)."""

    end: RunEnd
    judged: Verdict
    given: Given

    def concluded(self, req: RunRequest, output: OutputSettings) -> Outcome:
        """Its Outcome: the output parsed, the run's egress connections added."""
        return self.given.ended(conclude(req, self.end, self.judged, output))


Tried = Outcome | Ran | Unavailable


def attempt(req: RunRequest, settings: Settings, engine: Engine, cache: PluginCache, *,
            pool: WarmPool | None = None, gate: Gate | None = None,
            execute: Execute = run_container, bundle: bytes | None = None) -> Tried:
    """One attempt: an Outcome when it ended before a container ran the plugin (a refused
    content, payload, secret or container), Unavailable, or Ran."""
    try:
        prepared = prepare(req, settings, engine, cache, bundle)
    except SandboxUnavailable as exc:  # the engine could not say where its data lies
        return Unavailable(exc.message)
    if isinstance(prepared, Outcome):
        return prepared
    try:
        with given_to(gate, req, prepared.spec) as given:
            prepared.spec = given.spec
            end = execute(prepared, engine, pool if req.prewarm else None,
                          settings.output.cap_bytes, cache.root / "runs")
        end = given.masked(end)
    except (SecretError, ContainerRefused) as exc:
        return Outcome(Status.FAILED, exc.message)
    except SandboxUnavailable as exc:
        return Unavailable(exc.message)
    finally:
        prepared.close()
    judged = verdict(end, prepared.spec, settings.output.cap_bytes)
    if judged.status is Status.RETRYING:  # the engine's end, not the plugin's
        return Unavailable(judged.reason or "")
    return Ran(end, judged, given)


@contextlib.contextmanager
def given_to(gate: Gate | None, req: RunRequest, spec: RunSpec) -> Iterator[Given]:
    """What the gate gives the run; without a gate (a local run), nothing."""
    if gate is None:
        yield Given(spec)
        return
    with gate.given(req, spec) as given:
        yield given


