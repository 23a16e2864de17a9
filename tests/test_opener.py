"""The opener (manager.plugins.as_user / opener): a host path opened by a run's identity,
the kernel judging. Real processes, real files, no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hoststate import own_prefix

from manager.plugins.as_user import OpenRefused, open_as, opener

UID, GID = 2_099_990, 2_099_991  # in no account (the run range's top; never leased here)


@pytest.fixture
def tree() -> Iterator[Path]:
    """/var/tmp/<dir>/file, traversable by anyone (a test's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix=own_prefix("opener"), dir="/var/tmp"))
    root.chmod(0o755)
    (root / "file").write_text("readable")
    (root / "file").chmod(0o644)
    yield root
    shutil.rmtree(root)


def test_a_file_the_run_may_read_is_opened_and_read(tree: Path) -> None:
    fd = open_as(str(tree / "file"), UID, GID)
    with os.fdopen(fd, "rb") as fh:
        assert fh.read() == b"readable"


def test_the_kernel_refuses_what_the_run_may_not_read(tree: Path) -> None:
    (tree / "file").chmod(0o600)  # root's own: root could, the run cannot
    with pytest.raises(OpenRefused) as refused:
        open_as(str(tree / "file"), UID, GID)
    assert refused.value.denied and refused.value.depth == 4


def test_a_symlink_on_the_way_is_refused(tree: Path) -> None:
    (tree / "link").symlink_to(tree / "file")
    with pytest.raises(OpenRefused) as refused:
        open_as(str(tree / "link"), UID, GID)
    assert refused.value.linked


def test_root_is_never_the_identity() -> None:
    with pytest.raises(ValueError):
        open_as("/etc/hostname", 0, GID)


def test_a_killed_opener_is_started_again(tree: Path) -> None:
    os.close(open_as(str(tree / "file"), UID, GID))
    first = opener(os.getpid()).process
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    fd = open_as(str(tree / "file"), UID, GID)
    os.close(fd)
    again = opener(os.getpid()).process
    assert again is not None and again.pid != first.pid
