"""The bench's baseline: a plugin's container run directly through the Docker SDK."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import docker

from manager.plugins.manifest import load_manifest
from workers import options
from workers.engine import Engine
from workers.files import account_files, write_event
from workers.identity import Identities
from workers.run_spec import PoolConfig, RunSpec

PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"


class Bare:
    """The baseline: the same container and limits through the Docker SDK, no Titan
    (with `runtime`: under that runtime; `seccomp=False`: without a seccomp profile)."""

    def __init__(self, settings, client: docker.DockerClient, directory: Path,
                 runtime: str | None = None, seccomp: bool = True) -> None:
        directory.mkdir(mode=0o700)
        manifest = load_manifest(PLUGIN_DIR / "noop")
        self.identities = Identities(settings.identity)
        self.user = self.identities.take()  # a run's identity, as every container has
        config = PoolConfig("noop", "1.0.0", "sha256:bench", manifest.image,
                            tuple(manifest.argv), str(PLUGIN_DIR / "noop"),
                            manifest.run_limits(settings.limits), runtime=runtime)
        spec = RunSpec(config, "bench", "{}")
        spec = replace(spec, event_file=str(write_event(directory, spec, self.user)),
                       user=self.user, accounts=account_files(directory, self.user))
        labels = Engine(settings.engine, client).base_labels
        self.options = options.cold(spec, settings.sandbox, labels)
        self.options.pop("log_config")  # a plain `docker run` keeps the default log driver
        if not seccomp:
            self.options["security_opt"] = [*self.options["security_opt"], "seccomp=unconfined"]
        self.client = client

    def close(self) -> None:
        self.identities.give_back(self.user)

    def run(self) -> float:
        t0 = time.perf_counter()
        out = self.client.containers.run(**self.options, remove=True, stdout=True)
        assert b"tock" in out, out
        return time.perf_counter() - t0
