"""Host paths a plugin may read (SPEC §4): glob matching, payload path checks, mounts."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from manager.errors import PermissionDenied
from manager.manifest import check_glob, glob_base


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


def resolved_glob(glob: str) -> str | None:
    """The glob with its base directory resolved on this host, or None when the base is
    missing or resolves into a system path (a symlinked base must not widen access)."""
    base = glob_base(glob)
    real = os.path.realpath(base)
    if not os.path.isdir(real):
        return None
    resolved = real + glob[len(base):]
    try:
        check_glob(resolved)
    except ValueError:
        return None
    return resolved


def mount_sources(globs: Iterable[str]) -> list[str]:
    """Host directories to bind-mount read-only (at the same path) for these globs."""
    dirs = {glob_base(g) for g in (resolved_glob(g) for g in globs) if g}
    # A directory inside another mounted one adds nothing.
    return sorted(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def check_payload_path(payload: dict[str, Any], globs: Iterable[str]) -> str | None:
    """Resolves `payload.path` on the host and checks it against the allowed globs.

    Returns the resolved path (None when the payload names no path); raises
    PermissionDenied naming the path otherwise. Symlinks and '..' are resolved first, and
    hardlinked files are refused (a hardlink can alias a file outside the globs)."""
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
    allowed = [g for g in (resolved_glob(g) for g in globs) if g]
    if not any(glob_matches(real, g) for g in allowed):
        raise PermissionDenied(f"payload.path {path!r} (resolves to {real!r}) is outside the "
                               "plugin's allowed paths", path=path, resolved=real,
                               allowed=list(globs))
    try:
        st = os.stat(real)
    except OSError:
        return real
    if not os.path.isdir(real) and st.st_nlink > 1:
        raise PermissionDenied(f"payload.path {path!r} is a hardlinked file; refused",
                               path=path, resolved=real)
    return real
