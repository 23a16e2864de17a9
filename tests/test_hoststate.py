"""The suite's host check judges what the suite made, by its marks, and ignores what other
programs do beside it (tests/hoststate.py): a file of its own left in /tmp or a container
of a test instance fails the session; another program's file or container does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from hoststate import CLAIMS, MARK, HostState, claim, own_id, own_name, session_instance


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


def test_a_file_under_the_allowed_root_is_the_suites_only_when_it_claimed_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/srv/titan, where README's examples write under fixed names: what another program
    (a `make up` stack's user, another suite's docs test) adds or removes there is not this
    session's; what the session claimed and left is."""
    probe = "0123abcd" + "0" * 24
    monkeypatch.setenv(CLAIMS, str(tmp_path / "claims"))
    root, tag = Path("/srv/titan"), uuid.uuid4().hex[:8]
    made_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    old, new, left = (root / f"{who}-{tag}.md" for who in ("theirs-old", "theirs-new", "ours"))
    try:
        old.write_text("another program's, there before")
        before = HostState.read(probe)
        old.unlink()
        new.write_text("another program's, new")
        left.write_text("README's example, not removed")
        claim([left])
        changes = before.changes(HostState.read(probe))
        assert f"files: + {left}" in changes
        assert not [c for c in changes if str(old) in c or str(new) in c], changes
    finally:
        for path in (old, new, left):
            path.unlink(missing_ok=True)
        if made_root:
            root.rmdir()


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


def test_an_interface_rule_or_account_is_judged_by_its_mark() -> None:
    """Judged as session `probe`: the interface, the rule naming it and the account that
    carry its mark (or an account by an own name, untagged: a leak) are its; another
    session's, tagged with its own mark, are not."""
    probe = "0123abcd" + "0" * 24
    suffix = uuid.uuid4().hex[:5]
    links = {"mine": f"tb0123abcd{suffix}", "theirs": f"tb9999ffff{suffix}"}
    users = {"mine": f"titan-acct-s0123abcd-{suffix}", "theirs": f"titan-acct-s9999ffff-{suffix}",
             "leak": f"titanleak{suffix}"}
    before = HostState.read(probe)
    try:
        for link in links.values():
            subprocess.run(["ip", "link", "add", link, "type", "bridge"], check=True)
            subprocess.run(["iptables", "-A", "INPUT", "-i", link, "-j", "ACCEPT"], check=True)
        for user in users.values():
            subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", user], check=True)
        changes = before.changes(HostState.read(probe))
        assert f"interfaces: + {links['mine']} " in changes
        assert f"iptables: + iptables-save: -A INPUT -i {links['mine']} -j ACCEPT" in changes
        assert [c for c in changes if users["mine"] in c and "/etc/passwd" in c]
        assert [c for c in changes if users["leak"] in c and "/etc/passwd" in c]
        assert not [c for c in changes if links["theirs"] in c or users["theirs"] in c]
    finally:
        for link in links.values():
            subprocess.run(["iptables", "-D", "INPUT", "-i", link, "-j", "ACCEPT"], check=False)
            subprocess.run(["ip", "link", "delete", link], check=False)
        for user in users.values():
            subprocess.run(["userdel", user], check=False, capture_output=True)
    assert not before.changes(HostState.read(probe))


@pytest.mark.integration
def test_a_network_volume_or_image_is_judged_by_its_mark(docker_client, settings) -> None:
    """The engine's objects named with the session's mark are its (and a network's bridge
    and the engine's rules for it with them); another program's are not."""
    session = os.environ[MARK]
    before = HostState.read(session)
    other = f"another-program-{uuid.uuid4().hex[:6]}"
    networks = [docker_client.networks.create(name) for name in (own_name("net"), other)]
    volumes = [docker_client.volumes.create(name) for name in (own_name("vol"), other)]
    image = docker_client.images.get(settings.runtime_image)
    tags = [("titan-probe", own_id()), (other, "latest")]
    try:
        for repository, tag in tags:
            image.tag(repository, tag)
        changes = before.changes(HostState.read(session))
        mine_net = networks[0].id
        assert [c for c in changes if c.startswith(f"engine_networks: + {mine_net} ")]
        assert [c for c in changes if c.startswith(f"interfaces: + br-{mine_net[:12]}")]
        assert [c for c in changes if c.startswith("iptables: ") and f"br-{mine_net[:12]}" in c]
        assert [c for c in changes if c.startswith(f"volumes: + {volumes[0].name}")]
        assert [c for c in changes if c.startswith("images: ") and c.endswith(
            f"titan-probe:{tags[0][1]}")]
        assert not [c for c in changes if other in c or networks[1].id[:12] in c], changes
    finally:
        for network in networks:
            network.remove()
        for volume in volumes:
            volume.remove()
        for repository, tag in tags:
            docker_client.images.remove(f"{repository}:{tag}")
    assert not [c for c in before.changes(HostState.read(session)) if "probe" in c
                or other in c]
