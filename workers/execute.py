"""Launch: a run's container, prewarmed when one is ready for its configuration (a payload
file included: its copy goes where the container has a private directory mounted), else
cold, and followed to its end by the run loop. A warm start that broke before its
launcher took the run (nothing ran) becomes a cold one."""

from __future__ import annotations

import time
from pathlib import Path

from manager.core.observer import observer
from manager.core.run_end import RunEnd
from workers.cold import launched_cold
from workers.engine import Engine
from workers.files import takes_payload
from workers.handover import WarmBroken
from workers.pool import WarmPool
from workers.prepare import Prepared
from workers.run_loop import follow
from workers.warm import handed_over


def run_container(prepared: Prepared, engine: Engine, pool: WarmPool | None,
                  cap: int, runs_dir: Path) -> RunEnd:
    """Each output stream capped at `cap` bytes (workers.run_loop). Raises
    SandboxUnavailable when the engine cannot be used, and ContainerRefused when it will
    not run this container."""
    spec, t0 = prepared.spec, time.monotonic()
    warmable = pool is not None and takes_payload(spec.config, prepared.payload)
    warm = pool.take(spec) if warmable else None  # type: ignore[union-attr]
    end = None
    if warm is not None:
        try:
            with handed_over(warm, spec, prepared.payload) as launched:
                end = follow(launched, spec, cap, engine)
        except WarmBroken:
            end = None  # it never started the plugin: a cold container instead
        finally:
            pool.done(warm)  # type: ignore[union-attr]
    if end is None:
        with launched_cold(engine, spec, prepared.payload, runs_dir) as launched:
            end = follow(launched, spec, cap, engine)
    observer().container_ready(time.monotonic() - t0 - end.duration_s + end.ready_s)
    return end
