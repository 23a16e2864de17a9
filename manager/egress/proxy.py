"""The egress proxy of a host (SPEC §4, Egress): Squid, run by `make up` (or a test) as a
uid of its own, listening only on the gateway address of an internal Docker network that
runs with a net grant join (no route out, no traffic between containers), and reachable
there and nowhere else (an INPUT rule per bridge). Every request is decided by
`helper.py` against the run's grant; every request's end is written by `logd.py` into
the run's log; a destination that resolves to an internal address (loopback,
link-local, private ranges, this host's own networks) is refused unless the operator's
ceiling names that host explicitly. The check is Squid's `dst` ACL, on the addresses
Squid itself resolved and connects to (manager.egress.squidconf).

Its directory, `egress_dir`, is host-wide, outside the root-only run directory so the
proxy's uid can reach its part. Under compose the same prepared directory, network and
rules serve a proxy container on the host's network (`prepare`, then Squid in the
container: scripts/compose.sh)."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import psutil
from docker.errors import NotFound

from manager.core.config import Settings
from manager.core.errors import TitanError
from manager.core.groups import EgressSettings
from manager.egress.squidconf import HERE, TEMPLATES, layout, render

LABEL = "titan.egress"  # on the network: the instance whose proxy made it


class ProxyError(TitanError):
    """The proxy cannot be started or reached; the message says what to do."""

    code = "proxy_unavailable"


@dataclass(frozen=True)
class Where:
    """Where runs reach the proxy: the internal network and the proxy's address on it."""

    network: str
    gateway: str
    port: int

    def url(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@{self.gateway}:{self.port}"


def where(client: docker.DockerClient, settings: EgressSettings) -> Where:
    """The egress network's gateway (raises ProxyError when it does not exist)."""
    try:
        net = client.networks.get(settings.network)
    except NotFound:
        raise ProxyError(f"no egress network {settings.network!r}: the egress proxy "
                         "is not running on this host (make up starts it)") from None
    config = (net.attrs.get("IPAM") or {}).get("Config") or [{}]
    return Where(settings.network, config[0].get("Gateway", ""), settings.port)


def ensure_network(client: docker.DockerClient, settings: EgressSettings) -> Where:
    """The internal network (no gateway out, inter-container traffic off)."""
    try:
        client.networks.get(settings.network)
    except NotFound:
        client.networks.create(
            settings.network, driver="bridge", internal=True,
            options={"com.docker.network.bridge.name": settings.bridge,
                     "com.docker.network.bridge.enable_icc": "false"},
            labels={LABEL: settings.instance})
    found = where(client, settings)
    if not found.gateway:
        raise ProxyError(f"the network {settings.network!r} has no gateway address")
    return found


def ensure_account(name: str) -> tuple[int, int]:
    """The proxy's own system account (no home, no shell), made when missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", name], check=True,
                       capture_output=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, grp.getgrnam(name).gr_gid


def firewall(settings: EgressSettings, at: Where, add: bool) -> None:
    """Runs on the egress network reach this host at the proxy's port and nothing else."""
    tag = ["-m", "comment", "--comment", f"titan-egress:{settings.network}"]
    rules_ = [["-i", settings.bridge, "-j", "DROP", *tag],
              ["-i", settings.bridge, "-p", "tcp", "-d", at.gateway, "--dport",
               str(at.port), "-j", "ACCEPT", *tag]]
    for rule in rules_:
        present = subprocess.run(["iptables", "-C", "INPUT", *rule],
                                 capture_output=True).returncode == 0
        if add and not present:
            subprocess.run(["iptables", "-I", "INPUT", "1", *rule], check=True)
        elif not add:
            while subprocess.run(["iptables", "-D", "INPUT", *rule],
                                 capture_output=True).returncode == 0:
                pass


def processes(settings: EgressSettings) -> list[tuple[psutil.Process, bool]]:
    """The host's Squid processes of this configuration, the master first (True), then
    its kid: the pid file names the kid, which the master starts again (and the file
    lies where the proxy's own uid writes)."""
    conf = str(settings.dir / "squid.conf")
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "squid" and conf in cmdline:
            found.append((proc, cmdline[0] == "squid"))
    return sorted(found, key=lambda item: not item[1])


def running(settings: EgressSettings) -> bool:
    return any(master for _, master in processes(settings))


def prepare(settings: EgressSettings, client: docker.DockerClient, uid: int, gid: int,
            helpers: Path = HERE) -> Where:
    """Everything but Squid itself: the network, the firewall rules, the directory and
    squid.conf (naming `helpers` where Squid finds them)."""
    if not TEMPLATES.is_dir():
        raise ProxyError("squid is not installed (make up installs it)")
    at = ensure_network(client, settings)
    layout(settings, uid, gid)
    conf = settings.dir / "squid.conf"
    conf.write_text(render(settings, f"{at.gateway}:{at.port}", settings.user, helpers))
    os.chmod(conf, 0o644)
    firewall(settings, at, add=True)
    return at


def start(settings: EgressSettings, client: docker.DockerClient) -> Where:
    """Starts the proxy (Squid as a host process, as its own account) when it is not
    running, else reloads its configuration; returns where runs reach it."""
    if shutil.which("squid") is None:
        raise ProxyError("squid is not installed (make up installs it)")
    at = prepare(settings, client, *ensure_account(settings.user))
    conf = settings.dir / "squid.conf"
    if not running(settings):
        check = subprocess.run(["squid", "-k", "parse", "-f", str(conf)], capture_output=True,
                               text=True)
        if check.returncode:
            raise ProxyError(f"squid refused {conf}: {check.stderr.strip()[-800:]}")
        subprocess.run(["squid", "-f", str(conf)], check=True, capture_output=True)
    else:
        subprocess.run(["squid", "-k", "reconfigure", "-f", str(conf)], check=True,
                       capture_output=True)
    if not _wait(lambda: answers(at), 20):
        raise ProxyError(f"squid did not answer on {at.gateway}:{at.port}; see "
                         f"{settings.dir / 'var' / 'cache.log'}")
    return at


def stop(settings: EgressSettings, client: docker.DockerClient | None = None) -> None:
    """Stops the proxy and, with `client`, takes down what `prepare` set up."""
    # SIGTERM to the master, as `squid -k shutdown` would send it to the pid in the file
    # if that were not its kid's (which the master starts again); then, after
    # shutdown_lifetime, SIGKILL to whatever is left, the master first.
    for proc, master in processes(settings):
        if master:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
    if not _wait(lambda: not processes(settings), 15):
        for proc, _ in processes(settings):
            with contextlib.suppress(psutil.Error):
                proc.kill()
    if client is not None:
        teardown(settings, client)


def teardown(settings: EgressSettings, client: docker.DockerClient) -> None:
    """Removes the firewall rules, and the network when no container is on it: only this
    instance's (a network of the same name that another made is left alone)."""
    try:
        at = where(client, settings)
        net = client.networks.get(settings.network)
    except (ProxyError, NotFound):
        return
    if (net.attrs.get("Labels") or {}).get(LABEL) != settings.instance:
        return
    firewall(settings, at, add=False)
    if not net.attrs.get("Containers"):
        with contextlib.suppress(NotFound):
            net.remove()


def answers(at: Where) -> bool:
    """Whether the proxy accepts a connection where runs reach it."""
    try:
        with socket.create_connection((at.gateway, at.port), timeout=1):
            return True
    except OSError:
        return False


def _wait(check, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


def main(argv: list[str]) -> int:
    """`python -m manager.egress.proxy start|stop|status` (scripts/services.sh), and
    `prepare UID GID HELPERS` and `teardown` (scripts/compose.sh: Squid runs in a
    container there)."""
    settings = Settings.from_env().egress
    command = argv[0] if argv else "status"
    client = docker.from_env()
    try:
        if command == "start":
            at = start(settings, client)
            print(f"egress proxy on {at.gateway}:{at.port} (network {at.network})")
        elif command == "prepare":
            at = prepare(settings, client, int(argv[1]), int(argv[2]), Path(argv[3]))
            print(f"egress proxy prepared for {at.gateway}:{at.port} (network {at.network})")
        elif command == "stop":
            stop(settings, client)
        elif command == "teardown":
            teardown(settings, client)
        else:
            print("running" if running(settings) else "stopped")
            return 0 if running(settings) else 3
    except ProxyError as exc:
        print(f"egress proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
