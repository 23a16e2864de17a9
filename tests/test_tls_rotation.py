"""Rotation without losing an event: the block of docs/operations.md (Rotating
certificates and the Redis password) run as written, line by line, against the Redis
`make up` starts with TITAN_REDIS_BIND (TLS only, client certificates). A worker host
keeps writing the whole time and installs each new bundle as it comes; every event it
wrote is there at the end; each step lets in exactly the bundles it should."""

from __future__ import annotations

import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness import free_port, wait_until
from manager.core.clients import redis_client
from manager.core.config import ROOT, Settings

pytestmark = pytest.mark.integration
STREAM = "rotation:events"


def readme_steps() -> list[str]:
    """The commands of the rotation block (docs/operations.md), as written (comments
    dropped)."""
    text = (ROOT / "docs" / "operations.md").read_text()
    block = "make tls-check" + text.split("```sh\nmake tls-check", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


class Site:
    """A run directory with the Redis `make up` starts for worker hosts, and the commands
    an operator types in the project's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TITAN_")}
        self.env.update(TITAN_RUN_DIR=str(root / "run"), TITAN_REDIS_BIND="127.0.0.2",
                        TITAN_REDIS_PORT=str(free_port()))
        subprocess.run(["bash", "scripts/services.sh", "redis"], cwd=ROOT, env=self.env,
                       check=True, capture_output=True, timeout=120)
        self.bundles: list[Settings] = []

    def run(self, command: str) -> str:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=ROOT,
                              env=self.env, capture_output=True, timeout=300, check=False)
        assert done.returncode == 0, (command, done.stderr.decode())
        return done.stdout.decode(errors="replace")

    def worker_cert(self, command: str) -> Settings:
        """`make -s worker-cert NAME=worker-b > worker-b.tar` in the project's directory,
        the tar then taken to "host b" and unpacked there."""
        self.run(command)
        tar_path = ROOT / command.rsplit(">", 1)[1].strip()
        into = self.root / f"host-b-{len(self.bundles)}"
        try:
            with tarfile.open(tar_path) as tar:
                tar.extractall(into, filter="data")
        finally:
            tar_path.unlink()
        env = dict(line.split("=", 1) for line in (into / "titan.env").read_text().split())
        bundle = Settings.from_env(
            redis_url=env["TITAN_REDIS_URL"], redis_tls_ca=str(into / "tls/ca.crt"),
            redis_tls_cert=str(into / "tls/client.crt"),
            redis_tls_key=str(into / "tls/client.key"))
        self.bundles.append(bundle)
        return bundle

    def stop(self) -> None:
        subprocess.run(["bash", "scripts/services.sh", "stop"], cwd=ROOT, env=self.env,
                       check=False, capture_output=True, timeout=60)


class Writer(threading.Thread):
    """A worker host's steady writes: one event every 10 ms over one connection (after an
    error it would connect again with the newest bundle and write the same event again)."""

    def __init__(self, bundle: Settings) -> None:
        super().__init__(daemon=True)
        self.bundle, self.written, self.errors = bundle, 0, []
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = redis_client(self.bundle.redis)
        while not self.stopping.wait(0.01):
            try:
                conn.xadd(STREAM, {"n": self.written})
                self.written += 1
            except redis.RedisError as exc:
                self.errors.append(str(exc))
                conn = redis_client(self.bundle.redis)


def lets_in(bundle: Settings) -> bool:
    try:
        return bool(redis_client(bundle.with_().redis).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_readmes_rotation_steps_keep_every_write_and_let_in_what_they_should(
        site: Site) -> None:
    steps = readme_steps()
    assert len(steps) == 8 and steps[0] == "make tls-check", steps
    first = site.worker_cert("make -s worker-cert NAME=worker-b > worker-b.tar")
    writer = Writer(first)
    writer.start()
    wait_until(lambda: writer.written > 20, 30, "the worker host to write")
    before_ca = first
    for step in steps:
        if "worker-cert" in step:
            previous = site.bundles[-1]
            bundle = site.worker_cert(step)
            assert lets_in(bundle) and lets_in(previous), step  # both, between two steps
            writer.bundle = bundle  # host b installs it
            continue
        out = site.run(step)
        newest = site.bundles[-1]
        assert lets_in(newest), step
        if step == "make tls-check":
            assert "servers/redis.crt" in out and "clients/worker-b.crt" in out, out
        if step == "make tls-rotate-ca":
            before_ca = newest
        if step == "make tls-retire-ca":
            assert not lets_in(before_ca), "a bundle of the retired CA is still let in"
        if step == "make redis-retire-password":
            assert not lets_in(site.bundles[-2]), "the retired password is still accepted"

    before = writer.written
    wait_until(lambda: writer.written > before + 20, 30, "writes after the last step")
    writer.stopping.set()
    writer.join(10)
    seen = {int(f[b"n"]) for _, f in redis_client(site.bundles[-1].redis).xrange(STREAM)}
    assert seen == set(range(writer.written)), sorted(set(range(writer.written)) - seen)
    assert writer.errors == []  # its connection outlived every step
