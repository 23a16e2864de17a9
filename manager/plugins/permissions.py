"""Host paths a plugin may read (SPEC §4).

Allowed paths are an allow-list: a glob must lie under one of the operator's roots
(`TITAN_ALLOWED_ROOTS`), and never under a system path or this project's own data (run
directory, cache, Redis data, the Docker engine's data, home directories), whatever the
setting says. A glob's base is resolved at load and again at run time. Whether a run may
read a path is the kernel's verdict, not this module's: the path is opened once, with a
run's identity (manager.plugins.as_user: its uid and the runs' group, no capabilities),
component by component without following symlinks, and what is checked and copied is
that descriptor, so a swap after the check cannot change what a run sees. A refusal names
the rule and the path the event gave, never where a link pointed.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from manager.core.config import ROOT
from manager.core.errors import PermissionDenied
from manager.core.groups import FsSettings
from manager.core.runs import RunUser
from manager.plugins.as_user import OpenRefused, open_as
from manager.plugins.globs import SYSTEM_PATHS, check_glob, glob_base
from manager.plugins.safefs import UnsafePath, copy_fd, open_path

NEVER_GRANTED = (*SYSTEM_PATHS, "/home", "/var/lib/containerd", "/var/lib/redis",
                 "/var/log", "/var/spool", "/var/mail", "/var/backups", "/opt/containerd")


@lru_cache(maxsize=256)
def _glob_regex(glob: str) -> re.Pattern[str]:
    """'**' crosses directories, '*' and '?' do not; '[...]' is a character class."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and "]" in glob[i + 1:]:
            end = glob.index("]", i + 1)
            out.append("[" + glob[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_matches(path: str, glob: str) -> bool:
    return bool(_glob_regex(glob).match(path))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def never_granted(fs: FsSettings, extra: Iterable[str] = ()) -> list[str]:
    """Paths no plugin may be granted, whatever TITAN_ALLOWED_ROOTS says."""
    own = [ROOT, fs.run_dir, fs.cache_dir, fs.plugins_dir]
    paths = {*NEVER_GRANTED, *extra, *(str(p) for p in own),
             *(os.path.realpath(p) for p in own)}
    return sorted(paths)


def path_problem(path: str, fs: FsSettings, extra_forbidden: Iterable[str] = ()) -> str | None:
    """Why `path` (already resolved) may not be granted, or None."""
    roots = [os.path.realpath(r) for r in fs.allowed_roots]
    if not any(_under(path, r) for r in roots):
        names = ", ".join(str(r) for r in fs.allowed_roots) or "(none configured)"
        return f"is outside the allowed roots ({names}; set TITAN_ALLOWED_ROOTS)"
    for forbidden in never_granted(fs, extra_forbidden):
        if _under(path, forbidden) or (forbidden != "/" and _under(forbidden, path)):
            return f"reaches {forbidden}, which is never granted to plugins"
    return None


def glob_problem(glob: str, fs: FsSettings) -> str | None:
    """A load-time check of one `permissions.fs.allow` glob, base resolved on this host."""
    try:
        check_glob(glob)
    except ValueError as exc:
        return str(exc)
    base = glob_base(glob)
    for candidate in dict.fromkeys((base, os.path.realpath(base))):
        problem = path_problem(candidate, fs)
        if problem:
            shown = f"{base} (resolves to {candidate})" if candidate != base else base
            return f"fs glob {glob!r}: {shown} {problem}"
    return None


def check_globs(globs: Iterable[str], fs: FsSettings) -> list[str]:
    return [f"permissions.fs.allow: {p}" for g in globs if (p := glob_problem(g, fs))]


def resolved_glob(glob: str, fs: FsSettings) -> str | None:
    """The glob with its base resolved on this host, or None when the base is missing or
    may not be granted (a symlinked base must not widen access)."""
    base = glob_base(glob)
    real = os.path.realpath(base)
    if not os.path.isdir(real) or glob_problem(real + glob[len(base):], fs):
        return None
    return real + glob[len(base):]


def swappable_by(path: str) -> str | None:
    """Names the first component of `path` that a non-root user could rename or replace
    (a parent writable by others, unless sticky and the entry is root's), or None."""
    try:
        handle = open_path(path)
    except (UnsafePath, FileNotFoundError) as exc:
        return str(exc)
    os.close(handle)
    parts = Path(path).parts
    parent = os.stat("/")
    for n in range(1, len(parts)):
        current = os.stat("/".join(("", *parts[1:n + 1])), follow_symlinks=False)
        sticky_guard = parent.st_mode & stat.S_ISVTX and current.st_uid == 0
        if parent.st_uid != 0 or (parent.st_mode & 0o022 and not sticky_guard):
            return "/".join(("", *parts[1:n]))
        parent = current
    return None


def mount_sources(globs: Iterable[str], fs: FsSettings, judge: RunUser,
                  extra_forbidden: Iterable[str] = ()) -> list[str]:
    """Host directories to bind-mount read-only (at the same path) for these globs, each
    one a run's identity (`judge`) can open. A base that a non-root user could swap for
    a symlink is refused."""
    dirs = set()
    for glob in globs:
        resolved = resolved_glob(glob, fs)
        if resolved is None:
            continue
        base = glob_base(resolved)
        problem = path_problem(base, fs, extra_forbidden)
        if problem:
            raise PermissionDenied(f"allowed directory {base} {problem}", path=base)
        try:
            os.close(open_as(base, judge.uid, judge.gid, directory=True))
        except OpenRefused as exc:
            raise PermissionDenied(f"allowed directory {base}: {_refused(exc)} for the runs' "
                                   f"identity (group {judge.gid}); a run reads only what the "
                                   "kernel lets it", path=base) from None
        weak = swappable_by(base)
        if weak:
            raise PermissionDenied(f"allowed directory {base} could be swapped by a non-root "
                                   f"user (through {weak}); make its parents root-owned",
                                   path=base)
        dirs.add(base)
    return outermost(dirs)


def outermost(dirs: Iterable[str]) -> list[str]:
    """The directories not inside another of them (one inside a mounted one adds nothing)."""
    dirs = set(dirs)
    return sorted(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def payload_dirs(globs: Iterable[str], fs: FsSettings) -> tuple[str, ...]:
    """Where a payload file of these globs can lie: their resolved bases. A prewarmed
    container mounts an empty private directory at each, and a run's checked copy is put
    there at its path, as a cold container mounts the copy alone."""
    return tuple(outermost(glob_base(r) for g in globs if (r := resolved_glob(g, fs))))


def _refused(exc: OpenRefused) -> str:
    if exc.missing:
        return "does not exist"
    if exc.denied:
        return "permission denied"
    if exc.linked:
        return "a symlink (or a file where a directory was due) is on the way"
    return exc.args[0] if exc.args else "cannot be opened"


@dataclass
class PayloadFile:
    """A checked payload path: its resolved name and, when it exists, a read-only
    descriptor of exactly the object a run's identity opened."""

    path: str
    requested: str
    handle: int | None = None
    size: int = 0

    def stage(self, target: Path, user: RunUser) -> str | None:
        """Copies the checked object into `target`, a new file in a per-run directory,
        that `user` alone may read; returns its host path (None: there is no file)."""
        if self.handle is None:
            return None
        copy_fd(self.handle, str(target), self.size, (user.uid, user.gid))
        return str(target)

    def close(self) -> None:
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None


def open_payload_path(payload: dict[str, Any], globs: Iterable[str], fs: FsSettings,
                      judge: RunUser, extra_forbidden: Iterable[str] = ()) -> PayloadFile | None:
    """Resolves `payload.path`, checks it against the globs and roots, and opens it as
    `judge` (a run's identity), refusing it by its size before a byte is read.

    Raises PermissionDenied naming the path the event gave. A missing path is allowed (the
    run sees ENOENT); a directory, a hardlinked or special file, a path the kernel does not
    let the run's identity open, or one that changes while it is checked is refused."""
    path = payload.get("path")
    if path is None:
        return None
    if not isinstance(path, str) or not path or "\x00" in path:
        raise PermissionDenied("payload.path must be a non-empty string", path=str(path)[:200])
    if not os.path.isabs(path):
        raise PermissionDenied(f"payload.path {path!r} must be absolute", path=path)
    try:
        real = os.path.realpath(path, strict=True)
    except FileNotFoundError:
        real = os.path.realpath(path)
    except OSError as exc:  # a symlink loop, among others
        raise PermissionDenied(f"payload.path {path!r} cannot be resolved: {exc.strerror}",
                               path=path) from None
    if real != os.path.normpath(path):  # the run is shown the file at the name it was given
        raise PermissionDenied(f"payload.path {path!r} is a symlink or passes through one; "
                               "name the file itself", path=path)
    _check_allowed(path, real, globs, fs, extra_forbidden)
    try:
        handle = open_as(real, judge.uid, judge.gid)
    except OpenRefused as exc:
        if exc.missing:
            return PayloadFile(real, path)
        if exc.denied:
            raise PermissionDenied(f"payload.path {path!r}: permission denied for the runs' "
                                   f"identity (group {judge.gid}); a run reads only what the "
                                   "kernel lets it", path=path) from None
        raise PermissionDenied(f"payload.path {path!r} changed while it was checked or is "
                               "not a plain file; refused", path=path) from None
    checked = PayloadFile(real, path, handle)
    try:
        checked.size = _checked_size(path, os.fstat(handle), fs)
    except PermissionDenied:
        checked.close()
        raise
    return checked


def _check_allowed(path: str, real: str, globs: Iterable[str], fs: FsSettings,
                   extra_forbidden: Iterable[str]) -> None:
    globs = list(globs)
    allowed = [g for g in (resolved_glob(g, fs) for g in globs) if g]
    problem = path_problem(real, fs, extra_forbidden)
    if problem or not any(glob_matches(real, g) for g in allowed):
        raise PermissionDenied(f"payload.path {path!r} is outside the plugin's allowed "
                               "paths", path=path, allowed=globs)


def _checked_size(path: str, st: os.stat_result, fs: FsSettings) -> int:
    if stat.S_ISDIR(st.st_mode):
        raise PermissionDenied(f"payload.path {path!r} is a directory; only regular files "
                               "are handed to a run (globs mount directories)", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise PermissionDenied(f"payload.path {path!r} is not a regular file", path=path)
    if st.st_nlink > 1:
        raise PermissionDenied(f"payload.path {path!r} is a hardlinked file; refused", path=path)
    if st.st_size > fs.max_payload_bytes:
        raise PermissionDenied(f"payload.path {path!r} is {st.st_size} bytes, over the limit "
                               f"of {fs.max_payload_bytes} (TITAN_MAX_PAYLOAD_BYTES)",
                               path=path)
    return st.st_size
