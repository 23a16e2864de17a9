"""Validated requirements -> an installed directory, once per distinct content, shared by
every process of a host, mounted read-only into the plugin's container.

Installing never runs plugin-chosen code on the host: pip gets only the canonical lines
that `manager.requirements` accepted, installs wheels only (`--only-binary=:all:`: no
setup.py is ever executed) from the one index the operator configures, ignores pip's own
configuration and environment (`--isolated`), and its output is cut down to the line that
names the failing requirement. The manager installs at reload, workers on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from manager.config import Settings
from manager.errors import DependencyError
from manager.requirements import Requirements, parse_requirements
from manager.safefs import readable_tree

PIP_TIMEOUT_S = 600
PASS_ENV = ("PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
            "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR")
NO_WHEEL_RE = re.compile(r"No matching distribution found for (\S+)")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def mkdirs(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def private_root(cache_dir: Path) -> Path:
    """The cache root is root's alone: host users cannot reach event files or code in it."""
    mkdirs(cache_dir, 0o700)
    os.chmod(cache_dir, 0o700)
    return cache_dir


def deps_key(reqs: Requirements, settings: Settings) -> str:
    material = "\n".join([reqs.text(), settings.runtime_python, settings.pip_index_url])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def install_requirements(reqs: Requirements, settings: Settings) -> Path:
    """Installs `reqs` under `cache/deps/<key>` unless already there (a cache hit costs one
    stat)."""
    key = deps_key(reqs, settings)
    root = private_root(settings.cache_dir)
    target = root / "deps" / key
    if (target / ".complete").exists():
        return target
    with locked(root / "locks" / f"deps-{key}.lock"):
        if (target / ".complete").exists():
            return target
        work = Path(tempfile.mkdtemp(dir=mkdirs(root / "deps")))
        try:
            (work / "requirements.txt").write_text(reqs.text())
            site = work / "site"
            _pip_install(work / "requirements.txt", site, settings, reqs)
            readable_tree(str(site))
            (site / ".complete").write_text(key)
            if target.exists():
                shutil.rmtree(target)
            os.rename(site, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def pip_source(settings: Settings) -> list[str]:
    """Where packages come from: the operator's index, or only a local wheel directory."""
    if settings.pip_find_links:
        return ["--no-index", "--find-links", settings.pip_find_links]
    return ["--index-url", settings.pip_index_url]


def pip_command(req_file: Path, target: Path, settings: Settings) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--isolated", "--no-input", "--quiet",
            "--disable-pip-version-check", "--no-warn-script-location",
            "--only-binary=:all:", *pip_source(settings),
            "--python-version", settings.runtime_python, "--implementation", "cp",
            "--target", str(target), "-r", str(req_file)]


def download_wheels(plugins_dir: Path, dest: Path, settings: Settings) -> list[str]:
    """Fills a wheel directory for the plugins' validated requirements (for hosts whose
    containers reach no index: compose). Returns the plugins it did."""
    done = []
    for req in sorted(plugins_dir.glob("*/requirements.txt")):
        if req.is_symlink():
            continue
        lines = parse_requirements(req.read_bytes())
        with tempfile.TemporaryDirectory() as work:
            clean = Path(work) / "requirements.txt"
            clean.write_text(lines.text())
            subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--quiet",
                            "--disable-pip-version-check", "--only-binary=:all:",
                            *pip_source(settings), "--python-version", settings.runtime_python,
                            "--implementation", "cp", "--dest", str(dest), "-r", str(clean)],
                           check=True, timeout=PIP_TIMEOUT_S, env={
                               k: v for k, v in os.environ.items() if k in PASS_ENV})
        done.append(req.parent.name)
    return done


if __name__ == "__main__":  # python -m manager.deps PLUGINS_DIR DEST
    from manager.config import current

    print("wheels for:", ", ".join(download_wheels(Path(sys.argv[1]), Path(sys.argv[2]),
                                                   current())) or "nothing")


def _pip_install(req_file: Path, target: Path, settings: Settings, reqs: Requirements) -> None:
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV}
    env["HOME"] = str(req_file.parent)
    try:
        proc = subprocess.run(pip_command(req_file, target, settings), capture_output=True,
                              text=True, timeout=PIP_TIMEOUT_S, check=False, env=env,
                              cwd=req_file.parent)
    except subprocess.TimeoutExpired as exc:
        raise DependencyError(f"pip install timed out after {PIP_TIMEOUT_S}s") from exc
    if proc.returncode != 0:
        raise DependencyError(pip_failure(proc.stderr + proc.stdout, settings, reqs),
                              exit_code=proc.returncode)


def pip_failure(output: str, settings: Settings, reqs: Requirements) -> str:
    """The one line of pip's output that names the failing requirement, made actionable.
    (pip only ever saw the canonical lines and the operator's index: nothing it prints
    comes from a file the plugin does not own.)"""
    missing = NO_WHEEL_RE.search(output)
    if missing:
        name = missing.group(1)[:100]
        line = reqs.line_of(name)
        where = f"requirements.txt line {line}" if line else "requirements.txt"
        return (f"{where}: no wheel of {name} for Python {settings.runtime_python} on "
                f"{settings.pip_index_url} (sdists are never built on the host): pin a "
                "version that ships wheels, or vendor the pure-Python code into the plugin")
    errors = [ln.strip() for ln in output.splitlines() if ln.startswith("ERROR:")]
    last = errors[-1] if errors else "pip install failed"
    return f"requirements.txt did not install: {last[:300]}"
