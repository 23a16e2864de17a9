"""Installing a plugin never runs or reads anything on the host (SPEC §3): hostile
requirements.txt files through the real reload path (the API's answer and /plugins), the
CLI's validate, and a worker's first use of a bundle that never went through a reload.
Refusals never reach pip and are fast tests; what asks the package index or runs pip is
marked integration."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import private_settings, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.core.config import ROOT, Settings
from manager.core.contract import make_celery
from manager.plugins.registry import Registry

MANIFEST = """\
name: {name}
version: 1.0.0
triggers: [{{topic: install.v1, event_type: {name}}}]
entrypoint: python main.py
image: titan-runtime:py3.11
"""
EVIL_SETUP = """\
from setuptools import setup
open({marker!r}, "w").write("pwned")
setup(name="evilpkg", version="1.0")
"""
SECRETS = [Path("/etc/shadow"), Path("/etc/passwd")]


def secret_lines() -> list[str]:
    lines = []
    for path in SECRETS:
        lines += [ln for ln in path.read_text().splitlines() if len(ln) > 8]
    return lines


@pytest.fixture
def env(redis_url: str, tmp_path: Path, conn) -> Iterator[dict]:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    settings = private_settings(redis_url, plugins, tmp_path / "run")
    registry = Registry(wired(conn, settings))
    client = create_app(wired(conn, settings), registry,
                        Dispatcher(wired(conn, settings),
                                   make_celery(settings.broker))).test_client()
    marker = Path(f"/tmp/titan-pwned-{uuid.uuid4().hex[:8]}")
    yield {"settings": settings, "plugins": plugins, "client": client, "marker": marker,
           "tmp": tmp_path}
    assert not marker.exists(), "plugin-supplied code ran on the host"


def plugin(env: dict, name: str, requirements: str | None = None) -> Path:
    d = env["plugins"] / name
    d.mkdir()
    (d / "plugin.yaml").write_text(MANIFEST.format(name=name))
    (d / "main.py").write_text("print()\n")
    evil = d / "evilpkg"
    evil.mkdir()
    (evil / "setup.py").write_text(EVIL_SETUP.format(marker=str(env["marker"])))
    (d / "setup.py").write_text(EVIL_SETUP.format(marker=str(env["marker"])))
    if requirements is not None:
        (d / "requirements.txt").write_text(requirements.format(dir=d))
    return d


def reload_rejects(env: dict, name: str) -> str:
    """Reloads; returns the plugin's errors after checking no secret leaked anywhere."""
    answer = env["client"].post("/plugins/reload")
    assert answer.status_code == 200, answer.json
    (rejected,) = [r for r in answer.json["rejected"] if r["name"] == name]
    shown = answer.get_data(as_text=True) + env["client"].get("/plugins").get_data(as_text=True)
    shown += env["client"].get(f"/plugins/{name}").get_data(as_text=True)
    for line in secret_lines():
        assert line not in shown, "a line of a host file the plugin does not own was echoed"
    assert env["client"].get(f"/plugins/{name}").json["status"] == "invalid"
    return "; ".join(rejected["errors"])


@pytest.mark.parametrize(("requirements", "says"), [
    ("./evilpkg\n", "line 1: URLs and paths are not allowed"),
    ("{dir}/evilpkg\n", "line 1: URLs and paths are not allowed"),
    ("# a local sdist by name\nevilpkg @ file://{dir}/evilpkg\n", "line 2: URLs and paths"),
    ("six==1.16.0\n-r /etc/shadow\n", "line 2: options such as '-r' are not allowed"),
    ("-c /etc/passwd\n", "line 1: options such as '-c' are not allowed"),
    ("-e .\n", "line 1: options such as '-e' are not allowed"),
    ("six==1.16.0 \\\n  --install-option=--prefix=/\n", "line 1: per-line options"),
    # `===` compares strings: pip read this path as a local project and ran its setup.py
    ("x===/../../../../../../../..{dir}/evilpkg\n", "line 1: the version operator '==='"),
    ("evilpkg.tgz\n", "line 1: 'evilpkg.tgz' looks like a path or an archive"),
    ("six==1.16.0\nevilpkg.tar\n", "line 2: 'evilpkg.tar' looks like a path or an archive"),
    ("evilpkg.tar.bz2\n", "line 1: 'evilpkg.tar.bz2' looks like a path or an archive"),
    ("evilpkg.tar.xz\n", "line 1: 'evilpkg.tar.xz' looks like a path or an archive"),
    ("six==1.16.0-not-a-version\n", "line 1: not a valid requirement"),
])
def test_hostile_requirements_are_refused_naming_the_line(env, requirements: str,
                                                          says: str) -> None:
    plugin(env, "hostile_reqs", requirements)
    errors = reload_rejects(env, "hostile_reqs")
    assert says in errors and "only requirement lines are accepted" in errors, errors


def test_index_urls_are_refused_and_never_contacted(env) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        plugin(env, "own_index", f"--index-url http://127.0.0.1:{port}/simple\n"
                                 f"--extra-index-url http://127.0.0.1:{port}/x\nsix\n")
        errors = reload_rejects(env, "own_index")
        with pytest.raises(TimeoutError):
            server.accept()
    assert "line 1: options such as '--index-url' are not allowed" in errors


@pytest.mark.integration
def test_an_sdist_only_requirement_is_rejected_with_what_to_do(env) -> None:
    plugin(env, "sdist_only", "six==1.16.0\ndocopt==0.6.2\n")  # docopt ships no wheel
    errors = reload_rejects(env, "sdist_only")
    assert "line 2: no wheel of docopt==0.6.2 for Python 3.11" in errors, errors
    assert "pin a version that ships wheels, or vendor" in errors


@pytest.mark.integration
def test_a_version_that_does_not_exist_is_named_with_the_latest_that_do(env) -> None:
    plugin(env, "no_such_version", "six==99.0\n")
    errors = reload_rejects(env, "no_such_version")
    assert "line 1: six==99.0 matches no version with a wheel for Python 3.11" in errors
    assert "the latest that have one: " in errors and "1.16.0" in errors, errors


@pytest.mark.integration
def test_a_misspelled_requirement_is_named_as_missing_from_the_index(env) -> None:
    plugin(env, "misspelled", "tabulat==0.9.0\n")  # the index answers 404 for `tabulat`
    errors = reload_rejects(env, "misspelled")
    assert "line 1: https://pypi.org/simple has no project named tabulat (misspelled?)" \
        in errors, errors


def test_a_symlinked_requirements_file_is_never_read(env) -> None:
    d = plugin(env, "linked_reqs")
    (d / "requirements.txt").symlink_to("/etc/shadow")
    errors = reload_rejects(env, "linked_reqs")
    assert "requirements.txt: is a symlink" in errors, errors


@pytest.mark.parametrize(("requirements", "says"), [
    ("-r /etc/shadow\n", "line 1: options such as '-r' are not allowed"),
    ("x===/../../../../../../../..{dir}/evilpkg\n", "line 1: the version operator '==='"),
])
def test_validate_applies_the_same_rules(env, requirements: str, says: str) -> None:
    d = plugin(env, "validated", requirements)
    proc = subprocess.run([sys.executable, str(ROOT / "titan-plugins.py"), "validate", str(d)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "TITAN_CACHE_DIR": str(env["tmp"] / "cache")})
    assert proc.returncode == 1
    assert says in proc.stdout, proc.stdout
    for line in secret_lines():
        assert line not in proc.stdout + proc.stderr


@pytest.mark.integration
def test_a_wheel_only_requirement_installs_at_reload(env) -> None:
    plugin(env, "wheels_ok", "six==1.16.0 ; python_version >= '3'\n")
    answer = env["client"].post("/plugins/reload").json
    assert [a["name"] for a in answer["added"]] == ["wheels_ok"], answer
    deps = list((env["settings"].cache_dir / "deps").glob("*/six.py"))
    assert len(deps) == 1 and oct(deps[0].stat().st_mode)[-3:] == "644"


@pytest.mark.parametrize(("requirements", "says"), [
    (b"-r /etc/shadow\n", "line 1: options such as '-r'"),
    (b"x===/../../../../../../../../srv/x\n", "line 1: the version operator '==='"),
])
def test_a_worker_applies_the_same_rules_to_a_bundle_it_fetches(env, conn, requirements: bytes,
                                                               says: str) -> None:
    """A bundle put in Redis without a reload (as anyone with Redis access could) is
    checked again by the worker before anything is installed."""
    from manager.plugins.loader import build_bundle
    from manager.plugins.safefs import TreeFile
    from workers.plugin_cache import PluginCache

    settings: Settings = env["settings"]
    files = [TreeFile("main.py", b"print()\n", False),
             TreeFile("plugin.yaml", MANIFEST.format(name="sneaky").encode(), False),
             TreeFile("requirements.txt", requirements, False)]
    digest, bundle = build_bundle(files)
    conn.set(f"{settings.key_prefix}:bundle:{digest}", bundle)
    cache = PluginCache(Registry(wired(conn, settings)), settings.cache)
    with pytest.raises(Exception, match=re.escape(says)) as info:
        cache.deps_dir(cache.code_dir(digest))
    assert not any(line in json.dumps(str(info.value)) for line in secret_lines())
