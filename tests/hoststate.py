"""What the test suite may not change on the host it runs on: taken before the first test
and again after the last, and any difference fails the session (tests/conftest.py).

Network interfaces and their addresses, the host engine's networks, containers, volumes
and images, iptables rules, local users and groups (and their subordinate ids), the
entries of /tmp, /var/tmp and /srv/titan, and every process the suite started.

The suite is judged only for what carries its marks, never for what other programs do
beside it (a stack `make up` started, whose pool comes and goes on its own; anything
else writing to /tmp):
- a process is the suite's when it carries the session's mark in its environment (set
  before the first test, inherited by everything started from then on, daemons
  included);
- a container, when its `titan.instance` label is one of this session's test instances
  (`session_instance`: another suite's beside it is not this one's);
- an engine network, volume or image, a local account or group, when its name (or a
  label) carries the session's mark (`own_name`: what the tests create is named so);
- an interface, when its name carries the mark (`own_interface`) or it is the bridge of
  one of the session's engine networks; an iptables rule, when it carries the mark (the
  egress firewall's comment names its network) or names one of those interfaces;
- an entry of /srv/titan (the default allowed root, where README's examples put their
  files under fixed names), when the suite claimed it (`claim`, before it removes what it
  made there: what it could not remove is then its leak) or its name is the suite's;
- an entry of /tmp or /var/tmp, when its name starts with one of the prefixes the suite
  and the code it runs create their temporary files with (OWN_PREFIXES), unless it
  carries another session's tag: the suite tags what it makes there (`own_prefix`;
  `tempfile` itself writes in a tagged directory, tests/conftest.py), so another suite
  running beside it (a `make unit` while `make test` runs) is not this one's; the same
  for an account or group named with an own prefix (a leak under a fixed name is the
  suite's).
A container's end of a veth pair is judged with the containers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

MARK = "TITANTEST_SESSION"  # not TITAN_*: the harness strips those from child environments
TREES = (Path("/tmp"), Path("/var/tmp"))
DEEP_TREES = (Path("/srv/titan"),)
ID_FILES = (Path("/etc/passwd"), Path("/etc/group"), Path("/etc/subuid"), Path("/etc/subgid"))
# What the suite's temporary files are named (tempfile prefixes in tests/ and in the code
# they run, pytest's base directory): every other entry of /tmp and /var/tmp is not its.
OWN_PREFIXES = ("titan", "pytest-of-")
TAGGED = re.compile(r"-s([0-9a-f]{8})-")  # a session's tag in a name (session_tag)
# A file listing the paths the suite made under names it cannot tag (the session's own,
# inherited by every process of it; tests/conftest.py sets it)
CLAIMS = "TITANTEST_CLAIMS"


def claim(paths: list[Path]) -> None:
    """Says that the session made these paths (so that one left behind is its leak)."""
    if os.environ.get(CLAIMS):
        with open(os.environ[CLAIMS], "a") as ledger:
            ledger.writelines(f"{p}\n" for p in paths)


def claimed() -> frozenset[str]:
    try:
        return frozenset(Path(os.environ.get(CLAIMS, "")).read_text().splitlines())
    except OSError:
        return frozenset()


def session_tag(session: str) -> str:
    return f"s{session[:8]}"


def own_prefix(kind: str) -> str:
    """A tempfile prefix for what this session makes in /tmp or /var/tmp: tagged, so
    another session's check knows it is not its."""
    return f"titan-{kind}-{session_tag(os.environ.get(MARK, '0' * 8))}-"


def own_id() -> str:
    """A unique id carrying this session's tag, for names the tests make up (a compose
    project, an image's tag, an instance)."""
    return f"{session_tag(os.environ.get(MARK, '0' * 8))}-{uuid.uuid4().hex[:6]}"


def own_name(kind: str) -> str:
    """A name for an engine object or an account this session makes: tagged, unique."""
    return f"titan-{kind}-{own_id()}"


def own_interface() -> str:
    """An interface name for this session (IFNAMSIZ: 15 characters at most)."""
    return f"tb{os.environ.get(MARK, '0' * 8)[:8]}{uuid.uuid4().hex[:5]}"


def ours(name: str, session: str) -> bool:
    """A /tmp or /var/tmp entry this session answers for: one of its prefixes, and no
    other session's tag."""
    tagged = TAGGED.search(name)
    return name.startswith(OWN_PREFIXES) and (tagged is None
                                              or tagged.group(1) == session[:8])


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else ""


def interfaces(session: str, bridges: frozenset[str]) -> frozenset[str]:
    """The session's interfaces (its mark, or a bridge of its networks) with their
    addresses, as `name addr/len,addr/len`."""
    out = []
    for link in json.loads(_run("ip", "-j", "addr", "show") or "[]"):
        if session[:8] not in link["ifname"] and link["ifname"] not in bridges:
            continue
        addrs = sorted(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                       if a.get("scope") != "link")
        out.append(f"{link['ifname']} {','.join(addrs)}")
    return frozenset(out)


def session_instance(uid: str) -> str:
    """A test stack's instance name (its containers' `titan.instance` label), carrying the
    session's mark (a benchmark's, outside any session: zeros)."""
    return f"test-{os.environ.get(MARK, '0' * 8)[:8]}-{uid}"


def containers(session: str) -> frozenset[str]:
    """The ids of this session's containers (by their instance label)."""
    lines = _run("docker", "ps", "-a", "--no-trunc", "--format",
                 '{{.ID}} {{.Label "titan.instance"}}').split("\n")
    return frozenset(line.split()[0] for line in lines if len(line.split()) == 2
                     and line.split()[1].startswith(f"test-{session[:8]}-"))


def engine(kind: str, fmt: str, session: str) -> frozenset[str]:
    """The host engine's objects of one kind whose listing (`fmt`: names, labels) carries
    the session's mark, as listed."""
    whole = () if kind == "volume" else ("--no-trunc",)  # (volume ls has no such flag)
    lines = _run("docker", kind, "ls", *whole, "--format", fmt).splitlines()
    return frozenset(line for line in lines if session[:8] in line)


def bridges(networks: frozenset[str]) -> frozenset[str]:
    """The bridge interfaces of these engine networks (`id name ...` lines)."""
    ids = [line.split()[0] for line in networks]
    if not ids:
        return frozenset()
    named = _run("docker", "network", "inspect", "--format",
                 '{{.Id}} {{index .Options "com.docker.network.bridge.name"}}', *ids)
    found = set()
    for line in named.splitlines():
        net_id, _, name = line.partition(" ")  # a missing option prints "<no value>"
        found.add(name.strip() if name.strip() not in ("", "<no value>") else
                  f"br-{net_id[:12]}")
    return frozenset(found)


def iptables(session: str, interfaces: frozenset[str]) -> frozenset[str]:
    """The rules that carry the session's mark or name one of its interfaces."""
    names = {line.split()[0] for line in interfaces}
    rules = []
    for tool in ("iptables-save", "ip6tables-save"):
        rules += [f"{tool}: {line}" for line in _run(tool).splitlines()
                  if line and not line.startswith(("#", ":")) and
                  (session[:8] in line or names & set(line.split()))]
    return frozenset(rules)


def accounts(session: str) -> frozenset[str]:
    """The local accounts and groups (and their subordinate ids) named as the session's:
    its mark, or an own prefix with no other session's tag."""
    found = []
    for path in ID_FILES:
        for line in path.read_text().splitlines() if path.exists() else ():
            if ours(line.split(":")[0], session) or session[:8] in line:
                found.append(f"{path}: {line}")
    return frozenset(found)


def entries(root: Path, deep: bool, session: str) -> frozenset[str]:
    if not root.is_dir():
        return frozenset()
    if not deep:
        return frozenset(str(p) for p in root.iterdir() if ours(p.name, session))
    claims = claimed()
    return frozenset(str(p) for p in root.rglob("*") if str(p) in claims or ours(p.name, session))


def marked_processes(session: str) -> frozenset[str]:
    """Processes whose environment carries this session's mark, but this one."""
    found = []
    needle = f"{MARK}={session}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{pid} {command}")
    return frozenset(found)


@dataclass(frozen=True)
class HostState:
    interfaces: frozenset[str]
    engine_networks: frozenset[str]
    containers: frozenset[str]
    volumes: frozenset[str]
    images: frozenset[str]
    iptables: frozenset[str]
    ids: frozenset[str]
    files: frozenset[str]
    processes: frozenset[str]

    @classmethod
    def read(cls, session: str, ignore: frozenset[str] = frozenset()) -> HostState:
        """What carries this session's marks (the module's docstring says which)."""
        files = frozenset().union(*(entries(t, False, session) for t in TREES),
                                  *(entries(t, True, session) for t in DEEP_TREES)) - ignore
        networks = engine("network", "{{.ID}} {{.Name}} {{.Labels}}", session)
        links = interfaces(session, bridges(networks))
        return cls(links, networks, containers(session),
                   engine("volume", "{{.Name}} {{.Labels}}", session),
                   engine("image", "{{.ID}} {{.Repository}}:{{.Tag}}", session),
                   iptables(session, links), accounts(session), files,
                   marked_processes(session))

    def changes(self, after: HostState) -> list[str]:
        """What differs, one line per object: `+` appeared, `-` disappeared."""
        out = []
        for f in fields(self):
            before, now = getattr(self, f.name), getattr(after, f.name)
            out += [f"{f.name}: + {x}" for x in sorted(now - before)]
            out += [f"{f.name}: - {x}" for x in sorted(before - now)]
        return out
