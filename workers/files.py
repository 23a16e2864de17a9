"""The files a run reads on the host, each readable by the run's own uid alone: its event
(EVENT_FILE), the account files that name its uid inside its container, and its secrets
(/run/secrets, on a tmpfs)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from manager.core.runs import RunUser
from manager.core.secrets import SecretError
from manager.plugins.permissions import PayloadFile
from workers.run_spec import PoolConfig, RunSpec


def write_event(directory: Path, spec: RunSpec, user: RunUser) -> Path:
    """The run's event as a file in its private directory (EVENT_FILE) that its own uid
    alone may read, for either launch: a cold container mounts it, a prewarmed one reads
    its inbox."""
    path = directory / "event.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o400)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchown(fd, user.uid, user.gid)
        fh.write(spec.event_json)
    return path


def account_files(directory: Path, user: RunUser) -> dict[str, str]:
    """/etc/passwd and /etc/group for a container running as `user` (its uid has no entry
    in the image, and `whoami`, `ls -l`, pwd.getpwuid() look there): root, and the run's
    own account `plugin` in the group `plugins`. Written into the container's private
    directory; returns {path inside the container: host path}."""
    files = {"/etc/passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                            f"plugin:x:{user.uid}:{user.gid}:Titan plugin:/tmp:"
                            "/usr/sbin/nologin\n",
             "/etc/group": f"root:x:0:\nplugins:x:{user.gid}:\n"}
    mounts = {}
    for target, text in files.items():
        path = directory / f"etc-{Path(target).name}"
        path.write_text(text)
        path.chmod(0o444)
        mounts[target] = str(path)
    return mounts


SECRETS_PATH = "/run/secrets"


def secrets_home(path: Path) -> Path:
    """The tmpfs that secret files are written on (TITAN_SECRET_FILES_DIR; never a disk: a
    value must not outlive its run in a file system's free blocks); mounted at `path`
    when it is not one yet."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o711)
    if _is_tmpfs(path):
        return path
    # one mount, whichever worker process comes first: a second one over it would hide
    # the first one's files from the engine
    lock = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_tmpfs(path):
            done = subprocess.run(["mount", "-t", "tmpfs", "-o",
                                   "size=16m,mode=0711,nosuid,nodev,noexec", "titan-secrets",
                                   str(path)], capture_output=True, text=True)
            if done.returncode or not _is_tmpfs(path):
                raise SecretError(f"secrets need a tmpfs at {path} (TITAN_SECRET_FILES_DIR),"
                                  f" and mounting one failed: {done.stderr.strip()}")
    finally:
        os.close(lock)
    return path


def _is_tmpfs(path: Path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return any(line.split()[1:3] == [str(path), "tmpfs"] for line in fh)


def secrets_dir(home: Path, name: str) -> Path:
    """A private directory for one container's secrets under `home` (root's, listable:
    the names are no secret), mounted read-only at /run/secrets."""
    path = secrets_home(home) / name
    path.mkdir(mode=0o755, exist_ok=True)
    os.chmod(path, 0o755)
    return path


def write_secrets(directory: Path, secrets: tuple[tuple[str, bytes], ...],
                  user: RunUser) -> None:
    """Each secret as a file that the run's own uid alone may read (0400)."""
    for name, value in secrets:
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o400)
        with os.fdopen(fd, "wb") as fh:
            os.fchown(fd, user.uid, user.gid)
            fh.write(value)


# Where a prewarmed container has files of its own: no payload directory is mounted over
# them.
OWN_PATHS = ("/plugin", "/titan", "/tmp", "/dev")


def takes_payload(config: PoolConfig, payload: PayloadFile | None) -> bool:
    """Whether a prewarmed container of `config` can be handed this run's payload file:
    none, or one inside a payload directory it has mounted (never over its own files)."""
    if payload is None:
        return True
    if any(_overlaps(d, own) for d in config.payload_dirs for own in OWN_PATHS):
        return False
    return payload.handle is None or place(config, payload.path) is not None


def place(config: PoolConfig, path: str) -> tuple[int, str] | None:
    """(index of the payload directory, path inside it) for a payload file at `path`."""
    for index, base in enumerate(config.payload_dirs):
        if path.startswith(base.rstrip("/") + "/"):
            return index, os.path.relpath(path, base)
    return None


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")
