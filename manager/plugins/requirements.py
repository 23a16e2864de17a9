"""requirements.txt is data, not a pip command line (SPEC §3).

Only requirement lines are accepted: a name, extras, version specifiers, markers and
per-line `--hash`. Options, URLs, direct references (`name @ ...`) and paths are refused,
naming the line. pip only ever sees the canonical form rebuilt here, never the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from manager.core.errors import DependencyError

ALLOWED = ("only requirement lines are accepted: a name, extras, version specifiers, "
           "markers and --hash=ALG:DIGEST")
HASH_RE = re.compile(r"^(sha256|sha384|sha512):[0-9a-f]{64,128}$")
HASH_OPT_RE = re.compile(r"(?:^|\s)--hash(?:=|\s+)(\S+)")
MAX_LINES = 500
FILE = "requirements.txt"
# `===` (arbitrary equality) compares strings: pip reads a path there as a local project.
OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "~=")
# A name pip would read as a local archive or directory.
ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tgz", ".tbz", ".tbz2", ".txz", ".tlz", ".gz",
                    ".bz2", ".xz", ".lz", ".lzma", ".egg")


@dataclass(frozen=True)
class Requirements:
    """The validated requirements, in the form handed to pip, with their line numbers."""

    lines: tuple[str, ...]
    numbers: tuple[int, ...] = ()

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def line_of(self, requirement: str) -> int | None:
        """The line that asked for a package pip named (by canonical name)."""
        try:
            wanted = canonicalize_name(Requirement(requirement).name)
        except InvalidRequirement:
            return None
        for number, line in zip(self.numbers, self.lines, strict=False):
            if canonicalize_name(Requirement(line.split(" --hash")[0]).name) == wanted:
                return number
        return None


def _refuse(line_no: int, problem: str) -> DependencyError:
    return DependencyError(f"{FILE} line {line_no}: {problem}; {ALLOWED}",
                           file=FILE, line=line_no)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Joins backslash continuations and drops comments, as pip reads the file."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            out.append((start, line))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def _first_token(line: str) -> str:
    token = line.split()[0].split("=")[0]
    return token[:40] if re.fullmatch(r"-{1,2}[A-Za-z-]+", token[:40]) else "an option"


def parse_line(line_no: int, line: str) -> str:
    """One logical line -> its canonical form; raises DependencyError naming the line."""
    if line.startswith("-"):
        raise _refuse(line_no, f"options such as {_first_token(line)!r} are not allowed "
                               "(no -r, -c, -e, --index-url, --extra-index-url, --find-links, "
                               "--trusted-host)")
    if "$" in line:
        raise _refuse(line_no, "environment variables are not allowed")
    hashes = HASH_OPT_RE.findall(line)
    spec = HASH_OPT_RE.sub(" ", line).strip()
    if re.search(r"(^|\s)-", spec):
        raise _refuse(line_no, "per-line options other than --hash are not allowed")
    for digest in hashes:
        if not HASH_RE.fullmatch(digest):
            raise _refuse(line_no, "--hash must look like sha256:<hex digest>")
    if "://" in spec or spec.startswith((".", "/", "~")) or spec.endswith((".whl", ".zip",
                                                                         ".tar.gz")):
        raise _refuse(line_no, "URLs and paths are not allowed")
    try:
        req = Requirement(spec)
    except InvalidRequirement:
        raise _refuse(line_no, "not a valid requirement") from None
    if req.url:
        raise _refuse(line_no, "direct references (name @ URL or path) are not allowed")
    _check_name(line_no, req.name)
    for specifier in req.specifier:
        _check_specifier(line_no, specifier.operator, specifier.version)
    return " ".join([str(req), *(f"--hash={h}" for h in hashes)])


def _check_name(line_no: int, name: str) -> None:
    if "/" in name or "\\" in name or name.lower().endswith(ARCHIVE_SUFFIXES):
        raise _refuse(line_no, f"{name[:60]!r} looks like a path or an archive, not a "
                               "package name")


def _check_specifier(line_no: int, operator: str, version: str) -> None:
    """Only the comparison operators, each with a PEP 440 version (`==1.*` included)."""
    if operator not in OPERATORS:
        raise _refuse(line_no, f"the version operator {operator!r} is not allowed (use one "
                               f"of {' '.join(OPERATORS)})")
    plain = version[:-2] if operator in ("==", "!=") and version.endswith(".*") else version
    try:
        Version(plain)
    except InvalidVersion:
        raise _refuse(line_no, f"{version[:60]!r} is not a PEP 440 version") from None


def parse_requirements(data: bytes) -> Requirements:
    """Validates the bytes of a plugin's own requirements.txt."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DependencyError(f"{FILE} is not UTF-8 text", file=FILE) from None
    if "\x00" in text:
        raise DependencyError(f"{FILE} contains a NUL byte", file=FILE)
    lines = _logical_lines(text)
    if len(lines) > MAX_LINES:
        raise DependencyError(f"{FILE} has more than {MAX_LINES} requirements", file=FILE)
    return Requirements(tuple(parse_line(n, line) for n, line in lines),
                        tuple(n for n, _ in lines))
