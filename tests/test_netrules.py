"""The egress rule (manager.core.netrules), the ceiling at load, the proxy's log merged
into a run's connections and secrets masked in what a run wrote: pure logic."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from urllib.parse import quote

import pytest

from manager.core import netrules
from manager.core.config import Settings
from manager.core.groups import LimitSettings
from manager.egress import helper
from manager.egress.grants import merge
from manager.plugins.manifest import parse_manifest
from workers.given import MASK, mask

MANIFEST = b"""name: p
version: 0.1.0
triggers: [{topic: a, event_type: b}]
entrypoint: python main.py
image: titan-runtime:py3.11
permissions:
  net:
    allow: %s
"""


@pytest.mark.parametrize(("pattern", "host", "port", "allowed"), [
    ("hooks.example.com:443", "hooks.example.com", 443, True),
    ("hooks.example.com:443", "HOOKS.example.com.", "443", True),
    ("hooks.example.com:443", "hooks.example.com", 80, False),
    ("hooks.example.com:443", "evil.hooks.example.com", 443, False),
    ("*.example.org:443", "a.b.example.org", 443, True),
    ("*.example.org:443", "example.org", 443, False),
    ("*.example.org:443", "example.org.evil.net", 443, False),
    ("api.test:*", "api.test", 8080, True),
    ("10.0.0.5:8080", "10.0.0.5", 8080, True),
])
def test_a_pattern_allows_exactly_its_hosts(pattern, host, port, allowed) -> None:
    assert netrules.matches(pattern, host, port) is allowed


@pytest.mark.parametrize(("bad", "why"), [
    ("example.com", "must be host:port"), (":443", "must be host:port"),
    ("a b:443", "is not a host name"), ("x:0", "the port must be"),
    ("x:70000", "the port must be"), ("exa..mple.com:443", "is not a host name"),
    ("[::1]:443", "is not a host name"), ("h?st:443", "is not a host name")])
def test_a_malformed_pattern_is_refused_saying_why(bad, why) -> None:
    with pytest.raises(ValueError, match=why):
        netrules.parse(bad)


@pytest.mark.parametrize(("ceiling", "asked", "covered"), [
    ("*.example.org:*", "*.api.example.org:443", True),
    ("*.example.org:443", "x.example.org:443", True),
    ("*.example.org:443", "x.example.org:80", False),
    ("x.example.org:443", "*.example.org:443", False),  # a wildcard only under a wildcard
    ("api.test:8080", "api.test:*", False),
])
def test_the_ceiling_covers_only_what_it_allows(ceiling, asked, covered) -> None:
    assert netrules.covers(ceiling, asked) is covered


def test_a_plugin_asking_beyond_the_ceiling_is_invalid_naming_the_fix() -> None:
    manifest = parse_manifest(MANIFEST % b'["hooks.example.com:443", "api.test:80"]', "p", 65536)
    assert manifest.over_limits(LimitSettings(), ("hooks.example.com:443",)) == [
        "permissions.net.allow: 'api.test:80' is beyond the operator's ceiling "
        "(hooks.example.com:443); the operator may allow it in TITAN_EGRESS_ALLOW"]
    empty = manifest.over_limits(LimitSettings(), ())
    assert len(empty) == 2 and "empty: no plugin has a network" in empty[0]


def test_a_malformed_ceiling_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="TITAN_EGRESS_ALLOW"):
        Settings.from_env(egress_allow="hooks.example.com")


def test_the_proxy_log_makes_one_connection_per_decision() -> None:
    decided = [{"k": "d", "method": "CONNECT", "host": "a.test", "port": "443",
                "decision": "allowed", "why": None},
               {"k": "d", "method": "GET", "host": "x.wild.test", "port": "80",
                "decision": "allowed", "why": None},
               {"k": "d", "method": "GET", "host": "b.test", "port": "80",
                "decision": "refused", "why": "GET b.test:80 is not in permissions.net.allow"}]
    ended = [{"k": "a", "method": "GET", "host": "x.wild.test", "port": "80", "status": 403,
              "err": "ERR_TITAN_INNER", "from_run": 10, "to_run": 20},
             {"k": "a", "method": "CONNECT", "host": "a.test", "port": "443", "status": 200,
              "err": "-", "from_run": 500, "to_run": 4000}]
    seen = merge(decided, ended)
    assert [(c["host"], c["decision"]) for c in seen] == [
        ("a.test", "allowed"), ("x.wild.test", "refused"), ("b.test", "refused")]
    assert seen[0]["bytes_sent"] == 500 and seen[0]["bytes_received"] == 4000
    assert "internal address" in seen[1]["why"]
    assert seen[2]["status"] is None  # its end not logged (yet): the decision stands


def test_every_secret_is_masked_also_as_json_escapes_it() -> None:
    secrets = (("a", b'p"ss\\word'), ("b", b"short"))
    out = mask(b'{"x": "p\\"ss\\\\word"} p"ss\\word short', secrets)
    assert b"p\\\"ss" not in out and b"short" not in out and out.count(MASK) == 3


@pytest.fixture
def proxy_dirs(tmp_path):
    (tmp_path / "grants").mkdir()
    (tmp_path / "logs").mkdir()
    return tmp_path


def grant_line(user: str, password: str, host: str, port: int, source: str = "172.30.0.2",
               method: str = "GET") -> list[str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return [quote(f"Basic {token}"), host, str(port), method, source]


def write_grant(dirs, user="r0123456789abcdef", password="pw", **changes) -> None:
    grant = {"user": user, "secret_sha256": hashlib.sha256(password.encode()).hexdigest(),
             "allow": ["api.test:80"], "expires": time.time() + 60, "max_connections": 2,
             "max_bytes": 1000, "address": "172.30.0.2", **changes}
    (dirs / "grants" / f"{user}.json").write_text(json.dumps(grant))


def decide(dirs, fields):
    user, why = helper.decide(str(dirs / "grants"), str(dirs / "logs"), fields)
    if user:
        helper.record(str(dirs / "logs"), user, fields, why)
    return why


def test_the_proxy_helper_lets_through_only_a_live_grant_within_its_caps(proxy_dirs) -> None:
    write_grant(proxy_dirs)
    user = "r0123456789abcdef"
    assert decide(proxy_dirs, grant_line(user, "pw", "api.test", 80)) is None
    assert "not in permissions.net.allow" in decide(
        proxy_dirs, grant_line(user, "pw", "evil.test", 80))
    assert "belong to no live run" in decide(proxy_dirs, grant_line(user, "nope", "api.test", 80))
    assert "belong to another run" in decide(
        proxy_dirs, grant_line(user, "pw", "api.test", 80, source="172.30.0.9"))
    assert "no proxy credentials" in decide(proxy_dirs, ["-", "api.test", "80", "GET", "-"])
    assert decide(proxy_dirs, grant_line(user, "pw", "api.test", 80)) is None
    assert "2 connections, its limit" in decide(proxy_dirs, grant_line(user, "pw", "api.test", 80))
    write_grant(proxy_dirs, expires=time.time() - 1)
    assert "belong to no live run" in decide(proxy_dirs, grant_line(user, "pw", "api.test", 80))


def test_the_proxy_helper_stops_a_run_that_moved_its_bytes(proxy_dirs) -> None:
    write_grant(proxy_dirs, max_connections=10)
    user = "r0123456789abcdef"
    (proxy_dirs / "logs" / f"{user}.log").write_text(json.dumps(
        {"k": "a", "from_run": 600, "to_run": 500}) + "\n")
    assert "moved 1100 bytes, its limit" in decide(
        proxy_dirs, grant_line(user, "pw", "api.test", 80))
