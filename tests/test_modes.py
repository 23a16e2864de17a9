"""Switching modes: `make up` after `make down` works whatever mode either ran in, and a
Redis URL in the environment that contradicts the mode is named, with the fix, before
anything starts (scripts/services.sh, on a private run directory)."""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness import free_port, session_dir
from manager.core.config import ROOT

pytestmark = pytest.mark.integration


def services(run_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TITAN_")}
    return subprocess.run(["bash", "scripts/services.sh", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, check=False,
                          env={**clean, "TITAN_RUN_DIR": str(run_dir), **env})


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = session_dir() / f"modes-{uuid.uuid4().hex[:6]}" / "run"
    path.mkdir(parents=True)
    path.chmod(0o700)
    yield path
    services(path, "stop")


@pytest.mark.parametrize(("mode", "url", "says"), [
    ({"TITAN_REDIS_HA": "1"}, "unix://default:pw@/nowhere/redis.sock?db=0",
     "is a plain URL (the socket /nowhere/redis.sock), but TITAN_REDIS_HA=1 makes Redis "
     "speak TLS only: unset TITAN_REDIS_URL"),
    ({"TITAN_REDIS_BIND": "127.0.0.1"}, "redis://default:pw@127.0.0.1:6390/0",
     "is a plain URL (127.0.0.1:6390), but TITAN_REDIS_BIND makes Redis speak TLS only"),
    ({}, "rediss://default:pw@127.0.0.1:{port}/0",
     "is a TLS URL (127.0.0.1:{port}) that does not answer, and this make up starts a plain "
     "Redis"),
])
def test_a_url_of_another_mode_is_named_before_anything_starts(run_dir: Path, mode: dict,
                                                                url: str, says: str) -> None:
    port = str(free_port())
    done = services(run_dir, "redis", TITAN_REDIS_URL=url.format(port=port), **mode)
    assert done.returncode != 0 and says.format(port=port) in done.stderr, done.stderr
    assert not list(run_dir.iterdir()), "something started"


def test_a_plain_make_up_after_a_tls_one_keeps_its_password_on_the_socket(
        run_dir: Path) -> None:
    """What an HA or TITAN_REDIS_BIND `make up` leaves in run/redis.url (a rediss:// URL)
    is taken onto the plain stack's socket, with the same password."""
    password = secrets.token_hex(16)
    (run_dir / "redis.url").write_text(f"rediss://default:{password}@127.0.0.1:6379/0\n")
    done = services(run_dir, "redis")
    assert done.returncode == 0, done.stdout + done.stderr
    url = (run_dir / "redis.url").read_text().strip()
    assert url == f"unix://default:{password}@{run_dir}/redis.sock?db=0"
    assert redis.Redis.from_url(url).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(run_dir / "redis.sock"), password="wrong").ping()
