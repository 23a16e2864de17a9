"""The suite's host check judges what the suite made, by its marks, and ignores what other
programs do beside it (tests/hoststate.py): a file of its own left in /tmp or a container
of a test instance fails the session; another program's file or container does not."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from hoststate import MARK, HostState, session_instance


def test_a_file_the_suite_leaves_is_caught_and_another_programs_is_not() -> None:
    """Judged as session `probe`: its tagged files and untagged titan ones (a leak by a
    fixed name) are its; another program's, or another session's tagged ones, are not."""
    probe = "0123abcd" + "0" * 24
    before = HostState.read(probe)
    theirs = Path(tempfile.mkdtemp(prefix="another-program-", dir="/tmp"))
    ours = Path(tempfile.mkdtemp(prefix="titan-leak-", dir="/var/tmp"))
    tagged = Path(tempfile.mkdtemp(prefix="titan-files-s0123abcd-", dir="/var/tmp"))
    other_suites = Path(tempfile.mkdtemp(prefix="titan-pytest-s9999ffff-", dir="/tmp"))
    try:
        changes = before.changes(HostState.read(probe))
        assert f"files: + {ours}" in changes and f"files: + {tagged}" in changes
        assert not [c for c in changes if str(theirs) in c or str(other_suites) in c]
    finally:
        for path in (theirs, ours, tagged, other_suites):
            shutil.rmtree(path)
    assert not [c for c in before.changes(HostState.read(probe)) if str(ours) in c]


@pytest.mark.integration
def test_this_sessions_container_is_caught_and_another_suites_or_programs_is_not(
        docker_client, settings) -> None:
    session = os.environ[MARK]
    before = HostState.read(session)
    made = [docker_client.containers.create(settings.runtime_image, ["true"], labels=labels)
            for labels in ({"titan.instance": session_instance(uuid.uuid4().hex[:6])},
                           {"titan.instance": "a-live-stack"},
                           {"titan.instance": f"test-{'0' * 8}-another-suites"}, {})]
    try:
        changes = before.changes(HostState.read(session))
        mine = [c for c in changes if any(m.id in c for m in made)]  # (other tests' too)
        assert mine == [f"containers: + {made[0].id}"]
    finally:
        for container in made:
            container.remove(force=True)
