"""What the workers' Docker engines can run, as their heartbeats report it (images and
registered runtimes), and the warnings a reload gives a plugin its engines cannot run:
said when the plugin is loaded, not discovered from a failed run."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from manager.core.beats import WorkerBeat
from manager.core.groups import RuntimeSettings
from manager.core.keys import Keys
from manager.core.runs import Isolation
from manager.plugins.loader import PluginEntry


@dataclass(frozen=True)
class Engines:
    """Images and runtimes of the live workers' engines; None when no worker reports, so
    nothing can be said."""

    images: set[str] | None
    runtimes: set[str] | None

    @classmethod
    def of_workers(cls, conn: redis.Redis, keys: Keys) -> Engines:
        reporting = [b for b in WorkerBeat.all(conn, keys) if b.docker_ok]
        if not reporting:
            return cls(None, None)
        return cls({i for b in reporting for i in b.images},
                   {r for b in reporting for r in b.runtimes})

    def warnings(self, entry: PluginEntry, runtime: RuntimeSettings) -> tuple[str, ...]:
        return tuple(w for w in (image_warning(entry, self.images, runtime),
                                 runtime_warning(entry, self.runtimes, runtime)) if w)


def image_warning(entry: PluginEntry, images: set[str] | None, runtime: RuntimeSettings,
                  where: str = "any worker's Docker engine") -> str | None:
    """Why runs of this plugin would fail for want of its image (None: fine, or unknown)."""
    image = entry.manifest.image if entry.manifest else None
    if not image or images is None or image in images or f"{image}:latest" in images:
        return None
    return (f"image: {image!r} is not present on {where}; runs will fail until it is. "
            f"Use image: {runtime.image} (built by make up), or build or load "
            f"{image!r} on the workers")


def runtime_warning(entry: PluginEntry, runtimes: set[str] | None, runtime: RuntimeSettings,
                    where: str = "no live worker's engine has") -> str | None:
    """Why runs of this plugin would fail for want of the gVisor runtime (None: fine, or
    nothing can be said)."""
    if not entry.manifest or entry.isolation(runtime) != Isolation.GVISOR:
        return None
    if runtimes is None or runtime.gvisor in runtimes:
        return None
    return (f"isolation: gvisor needs the Docker runtime {runtime.gvisor!r}, which "
            f"{where}; its runs fail at once until it is registered (make up does it for "
            "the engine it starts; see docs/architecture.md, gVisor)")
