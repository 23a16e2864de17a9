"""Squid's configuration for the egress proxy (manager.egress.proxy runs it): the helpers
that decide and log each request, the addresses no wildcard may reach (the special-use
ranges and this host's own networks, checked by Squid's `dst` ACL on the addresses it
resolved and connects to), the hosts the ceiling names exactly, the caps, and the error
pages a refused plugin reads."""

from __future__ import annotations

import ipaddress
import os
import shutil
from pathlib import Path

import psutil

from manager.core import netrules as rules
from manager.core.groups import EgressSettings

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
TEMPLATES = Path("/usr/share/squid/errors/templates")  # Squid's own pages, copied
# Addresses no wildcard may reach (RFC 6890 special-purpose ranges, IPv4 and IPv6). Not
# ::ffff:0:0/96: Squid keeps every IPv4 address in that mapped form, so that range would
# refuse every destination (an IPv4-mapped address is checked as the IPv4 one it maps).
INNER = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
         "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
         "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "fc00::/7", "fe80::/10")
PAGES = {  # what the plugin reads in a refusal's body (%o: the helper's message)
    "ERR_TITAN_REFUSED": "%o\n",
    "ERR_TITAN_INNER": "refused: %M %H resolves to an internal address (loopback, "
                       "link-local, private or this host's): only a host the operator "
                       "names exactly in TITAN_EGRESS_ALLOW may\n",
}



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


def explicit_hosts(settings: EgressSettings) -> list[str]:
    """Hosts the ceiling names exactly: the only ones allowed to be internal."""
    return sorted({rules.parse(p)[0] for p in settings.allow if rules.explicit(p)})


def render(settings: EgressSettings, listen: str, user: str, helpers: Path = HERE) -> str:
    """squid.conf for this proxy, listening at `listen` (address:port) only; `helpers`:
    where Squid finds helper.py and logd.py
    (this directory, or where a proxy container has them mounted: its pid file is then
    its own, in the container's /run/squid)."""
    d = settings.dir
    pid_file = d / "var" / "squid.pid" if helpers == HERE else Path("/run/squid/squid.pid")
    helper = f"{SYSTEM_PYTHON} -Es {helpers / 'helper.py'} {d / 'grants'} {d / 'logs'}"
    hosts = settings.hosts or "none"
    explicit = " ".join(explicit_hosts(settings)) or "titan-egress.invalid"
    limit = settings.max_bytes
    return "\n".join([
        f"http_port {listen}",
        "icp_port 0", "htcp_port 0", "visible_hostname titan-egress",
        f"cache_effective_user {user}", f"cache_effective_group {user}",
        f"pid_filename {pid_file}", f"cache_log {d / 'var' / 'cache.log'}",
        "cache_store_log none", f"coredump_dir {d / 'var'}", "cache deny all",
        "cache_mem 8 MB", "pinger_enable off", f"hosts_file {hosts}",
        f"error_directory {d / 'errors'}", "forwarded_for delete",
        "httpd_suppress_version_string on", "shutdown_lifetime 1 seconds",
        "connect_timeout 10 seconds", f"client_lifetime {settings.max_timeout} seconds",
        f"request_body_max_size {limit} bytes", f"reply_body_max_size {limit} bytes",
        "logformat titan %et %rm %>rd %>rP %>Hs %Ss %err_code %>st %<st %tr",
        f"logfile_daemon {helpers / 'logd.py'}",
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


def layout(settings: EgressSettings, uid: int, gid: int) -> None:
    """The proxy's directory: grants/ (root's, its group reads), logs/ and var/ (its own),
    errors/ (the error pages, Squid's and ours)."""
    d = settings.dir
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
