"""The rules for globs in plugin.yaml: trigger patterns whose character classes close, and
host paths a plugin may be granted (absolute, no `..`, never a system path)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

GLOB_PART_RE = re.compile(r"^[A-Za-z0-9._*?\[\]-]*$")
SYSTEM_PATHS = ("/etc", "/proc", "/sys", "/dev", "/boot", "/usr", "/var/run", "/run",
                "/bin", "/sbin", "/lib", "/lib64", "/root", "/var/lib/docker")


def glob_base(glob: str) -> str:
    """The directory part of a glob before its first wildcard: what gets bind-mounted."""
    parts: list[str] = []
    for part in PurePosixPath(glob).parts[1:]:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return "/" + "/".join(parts)


def check_classes(pattern: str) -> None:
    """Refuses a pattern whose character classes do not close (`chat.[v1` would match
    only the literal text, never what its author meant) or a ']' that opens none."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "]":
            raise ValueError(f"{pattern!r} has a ']' with no '[' before it")
        if pattern[i] == "[":
            start = i + 1 + (pattern[i + 1:i + 2] == "!")
            end = pattern.find("]", start + 1)  # a ']' first in the class is one of it
            if end < 0:
                raise ValueError(f"{pattern!r} has a '[' that is never closed; a character "
                                 "class is [abc] or [a-z]")
            i = end
        i += 1


def check_glob(glob: str) -> None:
    """Refuses relative globs, '..', and globs reaching system paths (SPEC §4)."""
    if not glob.startswith("/"):
        raise ValueError(f"fs glob {glob!r} must be an absolute path")
    parts = PurePosixPath(glob).parts[1:]
    if any(p in ("..", ".") for p in parts) or "//" in glob:
        raise ValueError(f"fs glob {glob!r} must not contain '..', '.' or '//'")
    if not all(GLOB_PART_RE.fullmatch(p) for p in parts):
        raise ValueError(f"fs glob {glob!r} has characters outside [A-Za-z0-9._*?[]-]")
    base = glob_base(glob)
    if base == "/":
        raise ValueError(f"fs glob {glob!r} reaches the root filesystem")
    for system in SYSTEM_PATHS:
        if base == system or base.startswith(system + "/"):
            raise ValueError(f"fs glob {glob!r} reaches the system path {system}")
    if "docker.sock" in glob:
        raise ValueError(f"fs glob {glob!r} names the Docker socket")
    check_classes(glob)
