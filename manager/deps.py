"""requirements.txt -> an installed directory, once per distinct content (and runtime
Python), shared by every process of a host. pip runs outside the container; the result
is mounted read-only into it. The manager installs at reload (a broken requirements.txt
rejects the update), workers on other hosts install on first use."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from manager.errors import DependencyError

PIP_TIMEOUT_S = 600


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


def readable_tree(root: Path) -> None:
    """The sandbox user (not root) must be able to read what is mounted."""
    for dirpath, _dirs, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, 0o755 if os.stat(p).st_mode & 0o111 else 0o644)


def install_requirements(req: Path, root: Path, runtime_python: str) -> Path:
    """Installs `req` under `root/deps/<content key>` unless already there."""
    key = hashlib.sha256(req.read_bytes() + runtime_python.encode()).hexdigest()[:32]
    target = root / "deps" / key
    if (target / ".complete").exists():
        return target
    with locked(root / "locks" / f"deps-{key}.lock"):
        if (target / ".complete").exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=mkdirs(target.parent)))
        try:
            _pip_install(req, tmp, runtime_python)
            readable_tree(tmp)
            (tmp / ".complete").write_text(key)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pip_install(req: Path, target: Path, runtime_python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-input", "--no-warn-script-location", "--target", str(target),
           "-r", str(req)]
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if host != runtime_python:
        # Wheels for the runtime image's Python, not the worker's.
        cmd += ["--python-version", runtime_python, "--only-binary=:all:",
                "--implementation", "cp"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise DependencyError(f"pip install timed out after {PIP_TIMEOUT_S}s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise DependencyError(f"requirements.txt did not install: {tail}",
                              exit_code=proc.returncode)


def mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
