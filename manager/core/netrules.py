"""The egress allow-list rule, in one place: `host:port` patterns (a host name, an IPv4
address, or a glob whose `*` matches any characters, dots included; a port number or
`*`), matched case-insensitively. The plugin's `permissions.net.allow`, the operator's
ceiling (TITAN_EGRESS_ALLOW) and the proxy's helper all use this module; it imports only
the standard library, because the helper runs it with the system's Python as the proxy's
own uid."""

from __future__ import annotations

import fnmatch
import re

HOST_RE = re.compile(r"[a-z0-9*](?:[a-z0-9*.-]{0,251}[a-z0-9*])?\Z")
PORT_RE = re.compile(r"(?:[1-9][0-9]{0,4}|\*)\Z")


def parse(pattern: str) -> tuple[str, str]:
    """(host, port) of a pattern, lower-cased; raises ValueError saying what is wrong."""
    host, sep, port = pattern.strip().lower().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{pattern!r} must be host:port (e.g. hooks.example.com:443)")
    if not HOST_RE.match(host) or ".." in host:
        raise ValueError(f"{pattern!r}: {host!r} is not a host name, an IPv4 address or "
                         "a glob of one (letters, digits, '.', '-', '*')")
    if not PORT_RE.match(port) or (port != "*" and int(port) > 65535):
        raise ValueError(f"{pattern!r}: the port must be 1-65535 or '*'")
    return host, port


def explicit(pattern: str) -> bool:
    """A pattern with no wildcard names exactly one host and port."""
    return "*" not in pattern


def matches(pattern: str, host: str, port: int | str) -> bool:
    """Whether `host:port` is one the pattern allows."""
    p_host, p_port = parse(pattern)
    return (p_port in ("*", str(port)) and
            fnmatch.fnmatchcase(host.lower().rstrip("."), p_host))


def covers(ceiling: str, pattern: str) -> bool:
    """Whether every host:port `pattern` allows is also allowed by `ceiling` (a wildcard
    of the pattern can only be matched by a wildcard of the ceiling)."""
    c_host, c_port = parse(ceiling)
    p_host, p_port = parse(pattern)
    return (c_port == "*" or c_port == p_port) and fnmatch.fnmatchcase(p_host, c_host)


def allowing(patterns: list[str] | tuple[str, ...], host: str, port: int | str) -> str | None:
    """The first pattern that allows host:port, or None."""
    return next((p for p in patterns if matches(p, host, port)), None)


def beyond(ceiling: tuple[str, ...], asked: tuple[str, ...]) -> list[str]:
    """The asked patterns no ceiling pattern covers."""
    return [p for p in asked if not any(covers(c, p) for c in ceiling)]
