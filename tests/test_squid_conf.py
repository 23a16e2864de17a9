"""The egress proxy's configuration as Squid reads it (pure: nothing is started): it
parses without a complaint, and no range meant for internal addresses swallows a public
one (Squid keeps IPv4 addresses in IPv4-mapped form: a mapped range there refused every
destination)."""

from __future__ import annotations

import ipaddress
import pwd
import subprocess

import pytest

from manager.core.groups import EgressSettings
from manager.egress.squidconf import INNER, host_networks, layout, render


@pytest.fixture
def conf(tmp_path) -> str:
    settings = EgressSettings(dir=tmp_path / "egress",
                              allow=("api.test:443", "*.example.org:443"))
    account = pwd.getpwnam("proxy")  # Debian's, with a group of its name (Squid's package)
    layout(settings, account.pw_uid, account.pw_gid)
    return render(settings, "127.0.0.1:3128", "proxy")


def test_squid_parses_the_configuration_without_a_warning(conf, tmp_path) -> None:
    path = tmp_path / "squid.conf"
    path.write_text(conf)
    parsed = subprocess.run(["squid", "-k", "parse", "-f", str(path)], capture_output=True,
                            text=True, check=False)
    assert parsed.returncode == 0, parsed.stderr
    said = parsed.stdout + parsed.stderr
    assert "WARNING" not in said and "ERROR" not in said, said


@pytest.mark.parametrize("public", ["8.8.8.8", "151.101.1.69", "2606:4700::1111"])
def test_no_internal_range_covers_a_public_address(public) -> None:
    address = ipaddress.ip_address(public)
    ranges = [ipaddress.ip_network(n) for n in (*INNER, *host_networks())]
    assert not [n for n in ranges if n.version == address.version and address in n]
    assert not [n for n in ranges if n.prefixlen == 0]
    if address.version == 4:  # as Squid holds it
        mapped = ipaddress.ip_address(f"::ffff:{public}")
        assert not [n for n in ranges if n.version == 6 and mapped in n]


def test_only_hosts_the_ceiling_names_exactly_may_be_internal(conf) -> None:
    assert "acl explicit dstdomain -n api.test\n" in conf
