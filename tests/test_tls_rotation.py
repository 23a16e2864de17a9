"""Rotation without losing an event, as README's steps do it (`make tls-rotate-server`,
`tls-rotate-ca` then `tls-retire-ca`, `redis-rotate-password` then
`redis-retire-password`, and a new `make worker-cert` bundle between two steps), against
the Redis `make up` starts with TITAN_REDIS_BIND (TLS only, client certificates). A
worker host keeps writing the whole time; every event it wrote is there at the end; each
step lets in exactly the bundles it should."""

from __future__ import annotations

import io
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


class Site:
    """A run directory with the Redis `make up` starts for worker hosts, and the make
    targets as an operator types them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TITAN_")}
        self.env.update(TITAN_RUN_DIR=str(root / "run"), TITAN_REDIS_BIND="127.0.0.2",
                        TITAN_REDIS_PORT=str(free_port()))
        subprocess.run(["bash", "scripts/services.sh", "redis"], cwd=ROOT, env=self.env,
                       check=True, capture_output=True, timeout=120)
        self.bundles = 0

    def make(self, *args: str) -> str:
        done = subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=ROOT,
                              env=self.env, capture_output=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode(errors="replace")

    def worker_cert(self) -> Settings:
        """`make -s worker-cert NAME=host-b > host-b.tar`, unpacked on "host b"."""
        self.bundles += 1
        into = self.root / f"host-b-{self.bundles}"
        done = subprocess.run(["make", "-s", "--no-print-directory", "worker-cert",
                               "NAME=host-b"], cwd=ROOT, env=self.env, capture_output=True,
                              timeout=60, check=True)
        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
            tar.extractall(into, filter="data")
        env = dict(line.split("=", 1) for line in (into / "titan.env").read_text().split())
        return Settings.from_env(
            redis_url=env["TITAN_REDIS_URL"], redis_tls_ca=str(into / "tls/ca.crt"),
            redis_tls_cert=str(into / "tls/client.crt"),
            redis_tls_key=str(into / "tls/client.key"))

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
        conn = redis_client(self.bundle)
        while not self.stopping.wait(0.01):
            try:
                conn.xadd(STREAM, {"n": self.written})
                self.written += 1
            except redis.RedisError as exc:
                self.errors.append(str(exc))
                conn = redis_client(self.bundle)


def lets_in(bundle: Settings) -> bool:
    try:
        return bool(redis_client(bundle.with_()).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_every_rotation_step_keeps_the_writes_and_lets_in_what_it_should(site: Site) -> None:
    first = site.worker_cert()
    writer = Writer(first)
    writer.start()
    wait_until(lambda: writer.written > 20, 30, "the worker host to write")

    site.make("tls-rotate-server")
    assert lets_in(first)

    site.make("tls-rotate-ca")  # step 1: the new CA trusted beside the old
    second = site.worker_cert()
    assert lets_in(first) and lets_in(second)
    writer.bundle = second  # host b installs its new bundle
    site.make("tls-retire-ca")  # step 2: servers under the new CA, the old one gone
    assert lets_in(second) and not lets_in(first)

    site.make("redis-rotate-password")  # a second password beside the first
    third = site.worker_cert()
    assert lets_in(second) and lets_in(third)
    writer.bundle = third
    site.make("redis-retire-password")
    assert lets_in(third) and not lets_in(second)

    before = writer.written
    wait_until(lambda: writer.written > before + 20, 30, "writes after the last step")
    writer.stopping.set()
    writer.join(10)
    assert "days" in site.make("tls-check")
    seen = {int(f[b"n"]) for _, f in redis_client(third).xrange(STREAM)}
    assert seen == set(range(writer.written)), sorted(set(range(writer.written)) - seen)
    assert writer.errors == []  # its connection outlived every step
