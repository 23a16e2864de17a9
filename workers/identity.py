"""A host identity of its own for every plugin container (SPEC §4).

Each container runs as a uid that no host account, no other service and no other live
container has, in one group that every run shares and no host account has: so no
process on the host but root reaches into a run (its /proc files, its signals), no run
reaches another, and an operator grants or denies plugins a path by that group (its
mode bits, or an ACL entry `g:GID:---`) with the kernel as the judge.

The ids come from `TITAN_RUN_IDS` (default 2000000-2099999: the first is the runs'
group, the others are uids). A worker checks the range against /etc/passwd, /etc/group,
/etc/subuid and /etc/subgid when it starts and refuses one that overlaps; each lease
reads them again and skips a uid an account or subordinate range has been given since,
as does a prewarmed container's hand-out, and the heartbeat names such conflicts in
/health.

A uid is held through a file named after it in a host-wide directory (`TITAN_UID_DIR`,
/run/titan/uids: a tmpfs, so empty after a reboot, and shared by every worker process of
the host), created with O_EXCL when a container is made and removed with the container.
A killed worker leaves its files behind; the heartbeat takes one back once its owner is
gone, no process of the host runs as that uid any more (the kernel's own view, /proc)
and it is older than any run, one reclaimer at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from manager.core.errors import TitanError
from manager.core.run_groups import IdentitySettings
from manager.core.runs import RunUser
from workers.options import pid_alive, started

log = logging.getLogger(__name__)
ID_FILES = {"/etc/passwd": (2, 3), "/etc/group": (2,)}  # file -> the fields holding ids
SUB_FILES = ("/etc/subuid", "/etc/subgid")
TAKE_TRIES = 64
RECLAIM_MARGIN_S = 300  # beyond the longest run, before a dead owner's uid is taken back


@dataclass(frozen=True)
class RunIds:
    """The range of ids that runs use: its first id is the group, the rest are uids."""

    group: int
    first_uid: int
    last_uid: int

    @classmethod
    def parse(cls, text: str) -> RunIds:
        try:
            low, high = (int(part) for part in text.split("-", 1))
        except ValueError:
            raise TitanError(f"TITAN_RUN_IDS must be FIRST-LAST (numbers), got {text!r}"
                             ) from None
        if not 1000 < low < high <= 2**31 - 2 or high - low < 16:
            raise TitanError(f"TITAN_RUN_IDS {text!r}: need 1000 < FIRST, at least 16 ids, "
                             f"LAST below 2^31")
        return cls(low, low + 1, high)

    def overlaps(self, etc: Path = Path("/")) -> list[str]:
        """Where a host account, group or subordinate range already uses one of the ids."""
        return [what for what, _, _ in self.used(etc)]

    def used(self, etc: Path = Path("/")) -> list[tuple[str, int, int]]:
        """The host's ids within the range: (what, first, last) for each account, group
        and subordinate range that has some."""
        found = []
        for name, positions in ID_FILES.items():
            for line in _lines(etc / name.lstrip("/")):
                parts = line.split(":")
                for field in positions:
                    if len(parts) > field and parts[field].isdigit() \
                            and self.group <= int(parts[field]) <= self.last_uid:
                        found.append((f"{name}: {parts[0]} has id {parts[field]}",
                                      int(parts[field]), int(parts[field])))
        for name in SUB_FILES:
            for line in _lines(etc / name.lstrip("/")):
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    start, count = int(parts[1]), int(parts[2])
                    if start <= self.last_uid and self.group < start + count:
                        found.append((f"{name}: {parts[0]} has {start}-{start + count - 1}",
                                      start, start + count - 1))
        return found

    def conflict(self, uid: int, etc: Path = Path("/")) -> str | None:
        """What on the host has this uid (an account made after the workers started, a
        subordinate range), or None: such a uid is never used for a run."""
        return next((what for what, low, high in self.used(etc) if low <= uid <= high), None)

    def check_host(self, etc: Path = Path("/")) -> None:
        found = list(dict.fromkeys(self.overlaps(etc)))
        if found:
            raise TitanError(
                f"TITAN_RUN_IDS {self.group}-{self.last_uid} overlaps ids the host already "
                f"uses ({'; '.join(found[:5])}): a run would share an identity with them. "
                "Choose a free range (e.g. TITAN_RUN_IDS=3000000-3099999).")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return []


class Identities:
    """Per worker process: takes a free uid for a container, gives it back afterwards,
    and takes back what killed workers left."""

    def __init__(self, settings: IdentitySettings) -> None:
        self.ids = RunIds.parse(settings.run_ids)
        self.directory = settings.uid_dir
        self.max_age_s = settings.max_timeout + RECLAIM_MARGIN_S

    @property
    def group(self) -> int:
        return self.ids.group

    def take(self) -> RunUser:
        """A uid no live container of this host holds (with the runs' group), held until
        `give_back`."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lease = secrets.token_hex(8)
        owner = f"{os.getpid()} {started(os.getpid())} {lease}\n".encode()
        first, last = self.ids.first_uid, self.ids.last_uid
        start = random.randint(first, last)
        # random picks spread the leases; when they keep hitting held ones (a nearly full
        # range), every uid is tried once, so "none free" is only said when it is true
        candidates = itertools.chain(
            (random.randint(first, last) for _ in range(TAKE_TRIES)),
            range(start, last + 1), range(first, start))
        taken = self.ids.used()  # read again at every lease: accounts come and go
        shared = next((what for what, low, high in taken if low <= self.ids.group <= high),
                      None)
        if shared:
            raise TitanError(f"the runs' group {self.ids.group} is now the host's too "
                             f"({shared}): no run starts until that account or group is "
                             "removed, or TITAN_RUN_IDS names a free range")
        for uid in candidates:
            if any(low <= uid <= high for _, low, high in taken):
                continue  # someone on the host has it: never a run's
            try:
                fd = os.open(self.directory / str(uid),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                continue
            with contextlib.closing(os.fdopen(fd, "wb")) as fh:
                fh.write(owner)
            return RunUser(uid, self.ids.group, lease)
        raise TitanError(f"no free run uid in {self.directory}: all {last - first + 1} are "
                         "held (TITAN_RUN_IDS too small for this host's containers?)")

    def give_back(self, user: RunUser | None) -> None:
        """Ends the lease once its container is gone (never someone else's lease on the
        same uid: the token must match)."""
        if user is None:
            return
        path = self.directory / str(user.uid)
        with contextlib.suppress(FileNotFoundError):
            if path.read_text().split()[2:3] == [user.lease]:
                path.unlink()

    def give_back_label(self, label: str | None) -> None:
        """The lease named by a container's label (uid:token), for one being reaped."""
        uid, _, lease = (label or "").partition(":")
        if uid.isdigit() and lease:
            self.give_back(RunUser(int(uid), self.ids.group, lease))

    def _release(self, uid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / str(uid))

    def reclaim(self, older_than_s: float | None = None) -> list[int]:
        """Takes back the uids of dead owners that no process runs as any more, once
        their lease is older than any run (`older_than_s`, by default: the process table
        may not show every container's processes, as inside a compose worker)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        age = self.max_age_s if older_than_s is None else older_than_s
        candidates = [int(n) for n in names if n.isdigit() and self._owner_gone(int(n), age)]
        if not candidates:
            return []
        taken_back = []
        lock = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one reclaimer at a time, host-wide
            in_use = uids_in_use()
            for uid in candidates:
                if uid not in in_use and self._owner_gone(uid, age):
                    self._release(uid)
                    taken_back.append(uid)
        finally:
            os.close(lock)
        return taken_back

    def _owner_gone(self, uid: int, older_than_s: float) -> bool:
        path = self.directory / str(uid)
        try:
            text = path.read_text()
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        pid, start = [*text.split(), "", ""][:2]
        alive = pid.isdigit() and pid_alive(int(pid)) and started(int(pid)) == start
        return not alive and age > older_than_s


def uids_in_use() -> set[int]:
    """Every uid some process of this host (as far as /proc shows) runs as."""
    found: set[int] = set()
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids:
            found.update((uids.real, uids.effective, uids.saved))
    return found
