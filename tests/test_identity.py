"""Run identities (workers.identity): the range checked against the host's accounts and
subordinate ids, one live lease per uid, a lease ended only by its own holder, and a
killed worker's uids taken back only once nothing runs as them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hoststate import own_name

from harness import session_dir
from manager.core.config import Settings
from manager.core.errors import TitanError
from manager.core.runs import RunUser
from workers.identity import Identities, RunIds


def etc(tmp_path: Path, **files: str) -> Path:
    (tmp_path / "etc").mkdir(parents=True)
    for name, text in files.items():
        (tmp_path / "etc" / name).write_text(text)
    return tmp_path


def test_the_range_is_parsed_into_a_group_and_uids() -> None:
    ids = RunIds.parse("2000000-2099999")
    assert (ids.group, ids.first_uid, ids.last_uid) == (2000000, 2000001, 2099999)
    for bad in ("65534", "x-y", "100-200", "3000-3005", "2000000-1000000"):
        with pytest.raises(TitanError, match="TITAN_RUN_IDS"):
            RunIds.parse(bad)


def test_a_range_the_host_already_uses_is_refused_naming_who(tmp_path: Path) -> None:
    ids = RunIds.parse("200000-299999")
    clean = etc(tmp_path, passwd="root:x:0:0::/root:/bin/bash\nnobody:x:65534:65534::/:/x\n",
                group="root:x:0:\n", subuid="alice:100000:65536\n", subgid="")
    assert ids.overlaps(clean) == []
    ids.check_host(clean)
    used = etc(tmp_path / "b", passwd="svc:x:250000:100::/:/x\n",
               group="runners:x:200000:\n", subuid="bob:165536:65536\n",
               subgid="carol:231072:65536\n")
    found = ids.overlaps(used)
    assert any("svc has id 250000" in f for f in found)
    assert any("runners has id 200000" in f for f in found)
    assert any("bob has 165536-231071" in f for f in found)
    assert any("carol has 231072-296607" in f for f in found)
    with pytest.raises(TitanError, match="overlaps ids the host already uses"):
        ids.check_host(used)


@pytest.fixture
def identities(settings: Settings, tmp_path: Path) -> Identities:
    return Identities(settings.with_(uid_dir=str(tmp_path / "uids"),
                                      run_ids="3000000-3000019").identity)


def test_no_uid_is_held_twice_and_each_is_outside_the_host_accounts(
        identities: Identities) -> None:
    held = [identities.take() for _ in range(19)]  # every uid of the range
    assert len({u.uid for u in held}) == 19
    assert all(u.gid == 3000000 and 3000001 <= u.uid <= 3000019 for u in held)
    with pytest.raises(TitanError, match="no free run uid"):
        identities.take()
    identities.give_back(held[0])
    assert identities.take().uid == held[0].uid  # the only free one


def test_a_uid_the_host_gave_an_account_since_is_never_leased(
        identities: Identities) -> None:
    """A hostile local account made inside the range after the workers started (as root
    could be tricked into, or an admin unaware of the range): no lease gives its uid out,
    and the run's group given to an account stops every lease, naming it."""
    name = own_name("acct")
    subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-u", "3000007", name],
                   check=True)
    try:
        assert identities.ids.conflict(3000007) == f"/etc/passwd: {name} has id 3000007"
        assert identities.ids.conflict(3000008) is None
        held = [identities.take() for _ in range(18)]  # every uid of the range but one
        assert 3000007 not in {u.uid for u in held}
        with pytest.raises(TitanError, match="no free run uid"):
            identities.take()
        subprocess.run(["groupadd", "-g", "3000000", f"{name}g"], check=True)
        try:
            identities.give_back(held[0])
            with pytest.raises(TitanError, match=r"the runs' group 3000000 is now the host's"):
                identities.take()
        finally:
            subprocess.run(["groupdel", f"{name}g"], check=True)
    finally:
        subprocess.run(["userdel", name], check=True)


def test_a_lease_is_ended_only_by_its_holder(identities: Identities) -> None:
    user = identities.take()
    identities.give_back(RunUser(user.uid, user.gid, "not-the-lease"))
    assert (identities.directory / str(user.uid)).exists()
    identities.give_back_label(f"{user.uid}:{user.lease}")  # what the reaper reads
    assert not (identities.directory / str(user.uid)).exists()


def test_a_killed_workers_uid_is_taken_back_once_nothing_runs_as_it(
        identities: Identities) -> None:
    user = identities.take()
    lease = identities.directory / str(user.uid)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lease.write_text(f"{dead} 0 {user.lease}\n")  # its owner is gone
    assert identities.reclaim() == []  # younger than any run could be
    old = time.time() - identities.max_age_s - 1
    os.utime(lease, (old, old))
    holder = subprocess.Popen(["sleep", "60"], user=user.uid, group=user.gid,
                              extra_groups=[])  # a process still runs as the uid
    try:
        assert identities.reclaim() == []
    finally:
        holder.kill()
        holder.wait()
    assert identities.reclaim() == [user.uid]
    assert not lease.exists()


def test_the_session_keeps_its_leases_to_itself() -> None:
    assert session_dir().stat().st_mode & 0o077 == 0
