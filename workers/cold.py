"""The cold launch: one fresh container for the run (SPEC §4), created with every
protection (workers.options) as a uid of its own, in a private per-run directory (its
event file, its payload copy and its account files, readable by that uid alone), attached
to before it starts (no output is missed, none goes to a log driver on the host's disk).
When the run is over the container is removed and, once it is gone, its uid given back."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import requests
from docker.errors import APIError, DockerException, ImageNotFound

from manager.core.errors import ContainerRefused, SandboxUnavailable
from manager.egress.grants import pin
from manager.plugins.permissions import PayloadFile
from manager.plugins.safefs import mkdirs
from workers import options
from workers.container import ContainerHandle
from workers.engine import Engine
from workers.files import SECRETS_PATH, account_files, secrets_dir, write_event, write_secrets
from workers.run_loop import Launched
from workers.run_spec import RunSpec


@contextlib.contextmanager
def launched_cold(engine: Engine, spec: RunSpec, payload: PayloadFile | None,
                  runs_dir: Path) -> Iterator[Launched]:
    """A started container for the run, removed afterwards whatever happened. Raises
    ContainerRefused, or SandboxUnavailable when the engine cannot be used (the caller
    may retry)."""
    run_dir = mkdirs(runs_dir, 0o700) / f"{spec.invocation_id}-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700)
    started_wall = time.time()
    user = engine.identities.take()
    container: ContainerHandle | None = None
    secrets = None
    try:
        if spec.config.secrets:
            secrets = secrets_dir(engine.settings.secret_files_dir, run_dir.name)
            write_secrets(secrets, spec.secrets, user)
        staged = payload.stage(run_dir / "payload", user) if payload else None
        spec = replace(spec, event_file=str(write_event(run_dir, spec, user)), user=user,
                       accounts=account_files(run_dir, user),
                       payload=(staged, payload.path) if staged and payload else None)
        container = create(engine, spec, str(secrets) if secrets else None)
        try:
            container.attach()
            container.start()
            if spec.grant_file and spec.config.network:
                pin(spec.grant_file, container.address(spec.config.network))
        except (DockerException, requests.RequestException, OSError) as exc:
            raise SandboxUnavailable(f"cannot start container: {exc}") from exc
        yield Launched(container, container.frames(), started_wall, time.time(),
                       oom=engine.oom.watch(container.id))
    finally:
        if container is None or container.remove():  # else the reaper removes it, and
            engine.identities.give_back(user)        # ends the lease then
        shutil.rmtree(run_dir, ignore_errors=True)
        if secrets is not None:
            shutil.rmtree(secrets, ignore_errors=True)


def create(engine: Engine, spec: RunSpec, secrets: str | None) -> ContainerHandle:
    opts = options.cold(spec, engine.settings.sandbox, engine.base_labels)
    if secrets:
        opts["mounts"].append(options.bind(SECRETS_PATH, secrets))
    try:
        return engine.create(opts, spec.image)
    except ImageNotFound:  # not an outage: retrying cannot help
        raise ContainerRefused(engine.image_missing(spec.image)) from None
    except APIError as exc:
        if exc.is_client_error():  # the engine refused this container
            raise ContainerRefused(engine.refused(spec, exc)) from None
        raise SandboxUnavailable(f"cannot create container: {exc}") from exc
    except (DockerException, requests.RequestException) as exc:
        raise SandboxUnavailable(f"cannot create container: {exc}") from exc
