"""Validated requirements -> an installed directory, once per distinct content, shared by
every process of a host, mounted read-only into the plugin's container.

Installing never runs plugin-chosen code on the host: pip gets only the canonical lines
that `manager.plugins.requirements` accepted, installs wheels only (`--only-binary=:all:`) from
the one index the operator configures, ignores pip's own configuration and environment
(`--isolated`), and runs unprivileged in the install sandbox (`manager.plugins.installer`), whose
only writable place is its work directory: a line the parser missed still cannot reach
the host. Its output is cut down to the line that names the failing requirement. The
manager installs at reload, workers on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from manager.core.errors import DependencyError
from manager.core.groups import InstallSettings
from manager.plugins.installer import InstallSandbox, adopt
from manager.plugins.requirements import Requirements, parse_requirements
from manager.plugins.safefs import locked, mkdirs, private_root

PIP_TIMEOUT_S = 600
NO_WHEEL_RE = re.compile(r"No matching distribution found for (\S+)")
# pip's list of the versions it could use (with wheels for the runtime's Python)
VERSIONS_RE = re.compile(r"satisfies the requirement \S+ \(from versions: ([^)]*)\)")
LATEST_SHOWN = 5
PROJECT_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
INDEX_TIMEOUT_S = 10


def on_index(project: str, index_url: str) -> bool:
    """False only when the index answers 404 for the project's page (PEP 503): it has no
    such project. Any other answer, or none, is not taken as proof."""
    normalized = re.sub(r"[-_.]+", "-", project).lower()
    url = f"{index_url.rstrip('/')}/{urllib.parse.quote(normalized)}/"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=INDEX_TIMEOUT_S):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 404
    except (urllib.error.URLError, OSError, ValueError):
        return True


def deps_key(reqs: Requirements, settings: InstallSettings) -> str:
    material = "\n".join([reqs.text(), settings.runtime_python, settings.pip_index_url])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def install_requirements(reqs: Requirements, settings: InstallSettings) -> Path:
    """Installs `reqs` under `cache/deps/<key>` unless already there (a cache hit costs one
    stat). pip runs in the install sandbox (manager.plugins.installer), never as root."""
    key = deps_key(reqs, settings)
    root = private_root(settings.cache_dir)
    target = root / "deps" / key
    if (target / ".complete").exists():
        touch(target)
        return target
    with locked(root / "locks" / f"deps-{key}.lock"):
        if (target / ".complete").exists():
            return target
        sandbox = InstallSandbox(settings)
        with sandbox.workspace(mkdirs(root / "deps")) as work:
            listed = sandbox.put(work, "requirements.txt", reqs.text())
            wheels = download(sandbox, work, listed, settings, reqs)
            done = sandbox.pip(["install", *PIP_OPTIONS, "--no-warn-script-location",
                                "--no-index", "--find-links", wheels, *pip_target(settings),
                                "--target", f"{sandbox.inside(work)}/site", "-r", listed],
                               work, PIP_TIMEOUT_S)  # no network at all
            if done.returncode != 0:
                raise DependencyError(pip_failure(done.output, settings, reqs),
                                      exit_code=done.returncode)
            site = work / "site"
            site.mkdir(exist_ok=True)  # nothing to install (markers) is an empty tree
            adopt(site)
            (site / ".complete").write_text(key)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(site, target)  # a rename, unless the workspace is elsewhere
    return target


def download(sandbox: InstallSandbox, work: Path, listed: str, settings: InstallSettings,
             reqs: Requirements) -> str:
    """Resolves and downloads the wheels (nothing of a package runs) into the work
    directory; the only step with a network. Returns the wheel directory as pip sees it:
    with the operator's local wheels, the part of them kept for exactly these
    requirements (download_wheels), so no other plugin's wheels change what resolves."""
    if settings.pip_find_links:
        return f"{sandbox.wheels}/{deps_key(reqs, settings)}"
    wheels = f"{sandbox.inside(work)}/wheels"
    done = sandbox.pip(["download", *PIP_OPTIONS, *pip_source(settings, sandbox),
                        *pip_target(settings), "--dest", wheels, "-r", listed],
                       work, PIP_TIMEOUT_S, network=True)
    if done.returncode != 0:
        raise DependencyError(pip_failure(done.output, settings, reqs),
                              exit_code=done.returncode)
    return wheels


def touch(path: Path) -> None:
    """Marks a cache entry as used now (the janitor evicts the least recently used)."""
    with contextlib.suppress(OSError):
        os.utime(path)


PIP_OPTIONS = ("--isolated", "--no-input", "--quiet", "--disable-pip-version-check",
               "--no-cache-dir", "--only-binary=:all:")


def pip_source(settings: InstallSettings, sandbox: InstallSandbox) -> list[str]:
    """Where packages come from: the operator's index, or only a local wheel directory."""
    if settings.pip_find_links:
        return ["--no-index", "--find-links", sandbox.wheels]
    return ["--index-url", settings.pip_index_url]


def pip_target(settings: InstallSettings) -> list[str]:
    """Wheels for the runtime image's Python, whatever Python pip itself runs on."""
    return ["--python-version", settings.runtime_python, "--implementation", "cp"]


def download_wheels(plugins_dir: Path, dest: Path, settings: InstallSettings) -> list[str]:
    """Fills a wheel directory for the plugins' validated requirements (for hosts whose
    containers reach no index: compose), one subdirectory per set of requirements (its
    deps_key): an install finds only what its own requirements resolved to, never a
    version another plugin's brought in. pip runs in the install sandbox; only regular
    `.whl` files come out of it. Returns the plugins it did."""
    done = []
    sandbox = InstallSandbox(settings)
    mkdirs(dest)
    for req in sorted(plugins_dir.glob("*/requirements.txt")):
        if req.is_symlink():
            continue
        lines = parse_requirements(req.read_bytes())
        with tempfile.TemporaryDirectory(prefix="titan-deps-") as private, \
                sandbox.workspace(Path(private)) as work:
            listed = sandbox.put(work, "requirements.txt", lines.text())
            result = sandbox.pip(["download", *PIP_OPTIONS, *pip_source(settings, sandbox),
                                  *pip_target(settings), "--dest",
                                  f"{sandbox.inside(work)}/wheels", "-r", listed],
                                 work, PIP_TIMEOUT_S, network=True)
            if result.returncode != 0:
                raise DependencyError(f"{req}: " + pip_failure(result.output, settings, lines))
            own = mkdirs(dest / deps_key(lines, settings))
            for wheel in (work / "wheels").glob("*.whl"):
                if wheel.is_file() and not wheel.is_symlink():
                    shutil.copyfile(wheel, own / wheel.name)
        done.append(req.parent.name)
    return done


if __name__ == "__main__":  # python -m manager.plugins.deps PLUGINS_DIR DEST
    from manager.core.config import Settings

    print("wheels for:", ", ".join(download_wheels(Path(sys.argv[1]), Path(sys.argv[2]),
                                                   Settings.from_env().install)) or "nothing")


def pip_failure(output: str, settings: InstallSettings, reqs: Requirements) -> str:
    """The one line of pip's output that names the failing requirement, made actionable.
    (pip only ever saw the canonical lines and the operator's index: nothing it prints
    comes from a file the plugin does not own.)"""
    missing = NO_WHEEL_RE.search(output)
    if missing:
        name = missing.group(1)[:100]
        line = reqs.line_of(name)
        where = f"requirements.txt line {line}" if line else "requirements.txt"
        project = PROJECT_RE.match(name)
        if project and not settings.pip_find_links and not on_index(project.group(0),
                                                                      settings.pip_index_url):
            return (f"{where}: {settings.pip_index_url} has no project named "
                    f"{project.group(0)} (misspelled?)")
        usable = VERSIONS_RE.search(output)
        versions = [v.strip() for v in usable.group(1).split(",")] if usable else []
        versions = [v for v in versions if v and v != "none"]
        if versions:
            latest = ", ".join(reversed(versions[-LATEST_SHOWN:]))[:200]
            return (f"{where}: {name} matches no version with a wheel for Python "
                    f"{settings.runtime_python} on {settings.pip_index_url}; the latest "
                    f"that have one: {latest}")
        return (f"{where}: no wheel of {name} for Python {settings.runtime_python} on "
                f"{settings.pip_index_url} (sdists are never built on the host): pin a "
                "version that ships wheels, or vendor the pure-Python code into the plugin")
    errors = [ln.strip() for ln in output.splitlines() if ln.startswith("ERROR:")]
    last = errors[-1] if errors else "pip install failed"
    return f"requirements.txt did not install: {last[:300]}"
