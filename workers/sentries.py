"""Who else on this host holds the identity of gVisor's Sentries.

runsc starts every Sentry (the host process a gVisor run lives in) as host uid 65534,
hard-coded (runsc/sandbox/sandbox.go; Debian's 2022-12 runsc and upstream alike): no flag
changes it, and a user namespace in the container's spec does not help (runsc then starts
the Sentry without credentials of that namespace: it has no capability there and fails at
its first mount, measured). The kernel lets any process of that uid signal a Sentry and
read its /proc entries, so an operator must know when one runs beside the workers: the
heartbeat reports them and `/health` names them (`gvisor`)."""

from __future__ import annotations

import os

import psutil

SENTRY_UID = 65534
SENTRY_BYTES = str(SENTRY_UID).encode()
SHIM_PREFIX = "containerd-shim"


def is_sentry(proc: psutil.Process, runsc: str) -> bool:
    """A process of runsc's, started by root's runsc (while `runsc create` runs) or under
    a container shim: a Sentry or one of its ptrace stubs. Another process of that uid
    cannot have either as its parent (a shim reaps only its own descendants), whatever
    it calls itself."""
    try:
        while proc.uids().real == SENTRY_UID:
            if os.path.realpath(proc.exe()) != runsc:
                return False
            parent = proc.parent()
            if parent is None:
                return False
            proc = parent
        return proc.uids().real == 0 and (proc.name().startswith(SHIM_PREFIX)
                                          or os.path.realpath(proc.exe()) == runsc)
    except (psutil.Error, OSError):
        return False


def holding_the_uid() -> list[int]:
    """Pids whose real, effective or saved uid is the Sentries', from each process's
    `status` (its Uid line says all three, dumpable or not: a process cannot hide there
    as it can from the owner of its /proc directory). A few ms for a few hundred
    processes, a third of what psutil's objects cost."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as status:
                text = status.read(4096)
        except OSError:  # gone meanwhile
            continue
        start = text.find(b"\nUid:")
        if start >= 0 and SENTRY_BYTES in text[start + 5:text.find(b"\n", start + 5)].split()[:3]:
            found.append(int(entry.name))
    return found


def neighbours(runsc: str | None, limit: int = 10) -> list[str]:
    """Processes holding the Sentries' uid (real, effective or saved) that are not
    runsc's, as `pid N (name)`; none when this host has no runsc."""
    if not runsc:
        return []
    runsc = os.path.realpath(runsc)
    found: list[str] = []
    for pid in holding_the_uid():
        try:
            proc = psutil.Process(pid)
            if not is_sentry(proc, runsc):
                found.append(f"pid {pid} ({proc.name()})")
        except psutil.Error:
            continue
        if len(found) >= limit:
            break
    return found
