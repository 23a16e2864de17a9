"""The files a run reads on the host, each readable by the run's own uid alone: its event
(EVENT_FILE), and the account files that name its uid inside its container."""

from __future__ import annotations

import os
from pathlib import Path

from manager.core.runs import RunUser
from workers.spec import RunSpec


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
