"""The egress proxy of a host (SPEC §4, Egress): Squid, run by `make up` (or a test) as a
uid of its own, listening only on the gateway address of an internal Docker network that
runs with a net grant join (no route out, no traffic between containers), and reachable
there and nowhere else (an INPUT rule per bridge). Every request is decided by
`helper.py` against the run's grant; every request's end is written by `logd.py` into
the run's log; a destination that resolves to an internal address (loopback,
link-local, private ranges, this host's own networks) is refused unless the operator's
ceiling names that host explicitly. The check is Squid's `dst` ACL, on the addresses
Squid itself resolved and connects to.

Layout of `egress_dir` (host-wide, outside the root-only run directory so the proxy's uid
can reach its part): squid.conf and errors/ (root's, read-only), grants/ (root's, group
readable by the proxy: one file per live run), logs/ (the proxy's: one file per run, the
worker reads and removes it), var/ (the proxy's: pid, cache log)."""

from __future__ import annotations

import contextlib
import grp
import ipaddress
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

from manager.core import netrules as rules
from manager.core.config import Settings

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
TEMPLATES = Path("/usr/share/squid/errors/templates")
LABEL = "titan.egress"  # on the network: the instance whose proxy made it
# Addresses no wildcard may reach (RFC 6890 special-purpose ranges, IPv4 and IPv6).
INNER = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
         "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
         "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "fc00::/7", "fe80::/10",
         "::ffff:0:0/96")
PAGES = {  # what the plugin reads in a refusal's body (%o: the helper's message)
    "ERR_TITAN_REFUSED": "%o\n",
    "ERR_TITAN_INNER": "refused: %M %H resolves to an internal address (loopback, "
                       "link-local, private or this host's): only a host the operator "
                       "names exactly in TITAN_EGRESS_ALLOW may\n",
}


class ProxyError(RuntimeError):
    """The proxy cannot be started or reached; the message says what to do."""


@dataclass(frozen=True)
class Where:
    """Where runs reach the proxy: the internal network and the proxy's address on it."""

    network: str
    gateway: str
    port: int

    def url(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@{self.gateway}:{self.port}"


def where(client: docker.DockerClient, settings: Settings) -> Where:
    """The egress network's gateway (raises ProxyError when it does not exist)."""
    try:
        net = client.networks.get(settings.egress_network)
    except NotFound:
        raise ProxyError(f"no egress network {settings.egress_network!r}: the egress proxy "
                         "is not running on this host (make up starts it)") from None
    config = (net.attrs.get("IPAM") or {}).get("Config") or [{}]
    return Where(settings.egress_network, config[0].get("Gateway", ""), settings.egress_port)


def ensure_network(client: docker.DockerClient, settings: Settings) -> Where:
    """The internal network (no gateway out, inter-container traffic off)."""
    try:
        client.networks.get(settings.egress_network)
    except NotFound:
        client.networks.create(
            settings.egress_network, driver="bridge", internal=True,
            options={"com.docker.network.bridge.name": settings.egress_bridge,
                     "com.docker.network.bridge.enable_icc": "false"},
            labels={LABEL: settings.instance})
    found = where(client, settings)
    if not found.gateway:
        raise ProxyError(f"the network {settings.egress_network!r} has no gateway address")
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


def host_networks() -> list[str]:
    """This host's own addresses and the networks of its interfaces (Docker's bridges
    among them)."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for addr in addresses:
            if addr.family.name not in ("AF_INET", "AF_INET6") or not addr.netmask:
                continue
            try:
                net = ipaddress.ip_interface(f"{addr.address.split('%')[0]}/{addr.netmask}")
            except ValueError:
                continue
            found.update((net.network, ipaddress.ip_network(net.ip)))
    inner = [ipaddress.ip_network(n) for n in INNER]
    wider = inner + list(found)
    return sorted(str(n) for n in found  # (one already covered: Squid warns of it)
                  if n not in inner and not any(
                      n != w and n.version == w.version and n.subnet_of(w)  # type: ignore[arg-type]
                      for w in wider))


def explicit_hosts(settings: Settings) -> list[str]:
    """Hosts the ceiling names exactly: the only ones allowed to be internal."""
    return sorted({rules.parse(p)[0] for p in settings.egress_allow if rules.explicit(p)})


def render(settings: Settings, at: Where, user: str) -> str:
    d = settings.egress_dir
    helper = (f"{SYSTEM_PYTHON} -Es {HERE / 'helper.py'} {d / 'grants'} {d / 'logs'}")
    hosts = settings.egress_hosts or "none"
    explicit = " ".join(explicit_hosts(settings)) or "titan-egress.invalid"
    limit = settings.egress_max_bytes
    return "\n".join([
        f"http_port {at.gateway}:{at.port}",
        "icp_port 0", "htcp_port 0", "visible_hostname titan-egress",
        f"cache_effective_user {user}", f"cache_effective_group {user}",
        f"pid_filename {d / 'var' / 'squid.pid'}", f"cache_log {d / 'var' / 'cache.log'}",
        "cache_store_log none", f"coredump_dir {d / 'var'}", "cache deny all",
        "cache_mem 8 MB", "pinger_enable off", f"hosts_file {hosts}",
        f"error_directory {d / 'errors'}", "via off", "forwarded_for delete",
        "httpd_suppress_version_string on", "shutdown_lifetime 1 seconds",
        "connect_timeout 10 seconds", f"client_lifetime {settings.max_timeout} seconds",
        f"request_body_max_size {limit} bytes", f"reply_body_max_size {limit} bytes",
        "logformat titan %et %rm %>rd %>rP %>Hs %Ss %err_code %>st %<st %tr",
        f"logfile_daemon {HERE / 'logd.py'}",
        f"access_log daemon:{d / 'logs' / 'access.log'} logformat=titan",
        "buffered_logs off",
        "external_acl_type titan_grant children-max=16 children-startup=2 children-idle=2 "
        f"ttl=0 negative_ttl=0 cache=0 %>ha{{Proxy-Authorization}} %>rd %>rP %>rm %>a {helper}",
        "acl granted external titan_grant",
        f"acl inner dst {' '.join(INNER)} {' '.join(host_networks())}",
        f"acl explicit dstdomain -n {explicit}",
        "deny_info ERR_TITAN_REFUSED granted", "deny_info ERR_TITAN_INNER explicit",
        "http_access deny !granted", "http_access deny inner !explicit",
        "http_access allow all", ""])


def layout(settings: Settings, uid: int, gid: int) -> None:
    d = settings.egress_dir
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o711)
    # the directories above it (/run/titan/egress: the run uids' leases live in /run/titan
    # too, in a 0700 directory of their own) let the proxy's uid pass through
    for parent in (d.parent, d.parent.parent) if d.parent.name == "egress" else (d.parent,):
        os.chmod(parent, os.stat(parent).st_mode & 0o7777 | 0o111)
    for name, owner, mode in (("grants", (0, gid), 0o750), ("logs", (uid, gid), 0o700),
                              ("var", (uid, gid), 0o700), ("errors", (0, 0), 0o755)):
        (d / name).mkdir(exist_ok=True)
        os.chown(d / name, *owner)
        os.chmod(d / name, mode)
    for template in TEMPLATES.iterdir():
        shutil.copyfile(template, d / "errors" / template.name)
    for name, text in PAGES.items():
        (d / "errors" / name).write_text(text)
    for page in (d / "errors").iterdir():
        os.chmod(page, 0o644)  # whatever the umask: the proxy's uid reads them


def firewall(settings: Settings, at: Where, add: bool) -> None:
    """Runs on the egress network reach this host at the proxy's port and nothing else."""
    tag = ["-m", "comment", "--comment", f"titan-egress:{settings.egress_network}"]
    rules_ = [["-i", settings.egress_bridge, "-j", "DROP", *tag],
              ["-i", settings.egress_bridge, "-p", "tcp", "-d", at.gateway, "--dport",
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


def pid(settings: Settings) -> int | None:
    try:
        found = int((settings.egress_dir / "var" / "squid.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return found if psutil.pid_exists(found) else None


def start(settings: Settings, client: docker.DockerClient) -> Where:
    """Starts the proxy when it is not running; returns where runs reach it."""
    if shutil.which("squid") is None:
        raise ProxyError("squid is not installed (make up installs it)")
    at = ensure_network(client, settings)
    uid, gid = ensure_account(settings.egress_user)
    layout(settings, uid, gid)
    conf = settings.egress_dir / "squid.conf"
    conf.write_text(render(settings, at, settings.egress_user))
    os.chmod(conf, 0o644)
    firewall(settings, at, add=True)
    if pid(settings) is None:
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
                         f"{settings.egress_dir / 'var' / 'cache.log'}")
    return at


def stop(settings: Settings, client: docker.DockerClient | None = None) -> None:
    """Stops the proxy and removes its firewall rules (and the network, when no
    container is on it)."""
    running = pid(settings)
    conf = settings.egress_dir / "squid.conf"
    if running is not None:
        subprocess.run(["squid", "-k", "shutdown", "-f", str(conf)], capture_output=True)
        if not _wait(lambda: not psutil.pid_exists(running), 15):
            os.kill(running, 9)
    if client is not None:
        try:
            at = where(client, settings)
        except ProxyError:
            return
        net = client.networks.get(settings.egress_network)
        if (net.attrs.get("Labels") or {}).get(LABEL) != settings.instance:
            return  # another's, of the same name: not this proxy's to take down
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
    """`python -m manager.egress.proxy start|stop|status` (scripts/services.sh)."""
    settings = Settings.from_env()
    command = argv[0] if argv else "status"
    client = docker.from_env()
    try:
        if command == "start":
            at = start(settings, client)
            print(f"egress proxy on {at.gateway}:{at.port} (network {at.network})")
        elif command == "stop":
            stop(settings, client)
        else:
            print("running" if pid(settings) else "stopped")
            return 0 if pid(settings) else 3
    except ProxyError as exc:
        print(f"egress proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
