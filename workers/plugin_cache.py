"""A worker host's local copies: plugin code by digest, requirements by content.

Code comes from the bundle in Redis (no shared filesystem with the manager), is checked
against its digest, and is unpacked once per host; requirements.txt is installed once per
distinct content with pip outside the container, then mounted read-only into it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from manager.config import Settings
from manager.errors import BundleError, DependencyError
from manager.registry import Registry, bundle_digest

PIP_TIMEOUT_S = 600


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every worker process on this host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _readable_tree(root: Path) -> None:
    """The sandbox user (not root) must be able to read what is mounted."""
    for dirpath, _dirs, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.chmod(p, 0o755 if os.stat(p).st_mode & 0o111 else 0o644)


class PluginCache:
    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.root = settings.cache_dir
        self.runtime_python = settings.runtime_python

    def code_dir(self, digest: str) -> Path:
        """The unpacked plugin for a digest, fetched from Redis when absent here."""
        target = self.root / "plugins" / digest.replace(":", "-")
        if target.is_dir():
            return target
        with _locked(self.root / "locks" / f"{target.name}.lock"):
            if target.is_dir():
                return target
            bundle = self.registry.bundle(digest)
            if bundle is None:
                raise BundleError(f"bundle {digest} is not in the store", digest=digest)
            actual = bundle_digest(bundle)
            if actual != digest:
                raise BundleError(f"bundle content {actual} does not match {digest}",
                                  digest=digest)
            tmp = Path(tempfile.mkdtemp(dir=_mk(target.parent)))
            with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
                tar.extractall(tmp, filter="data")
            _readable_tree(tmp)
            os.rename(tmp, target)
        return target

    def deps_dir(self, code_dir: Path) -> Path | None:
        """Installs requirements.txt (if any) into a directory keyed by its content."""
        req = code_dir / "requirements.txt"
        if not req.is_file():
            return None
        content = req.read_bytes()
        key = hashlib.sha256(content + self.runtime_python.encode()).hexdigest()[:32]
        target = self.root / "deps" / key
        if (target / ".complete").exists():
            return target
        with _locked(self.root / "locks" / f"deps-{key}.lock"):
            if (target / ".complete").exists():
                return target
            _mk(target.parent)
            tmp = Path(tempfile.mkdtemp(dir=target.parent))
            try:
                self._pip_install(req, tmp)
                _readable_tree(tmp)
                (tmp / ".complete").write_text(key)
                if target.exists():
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _pip_install(self, req: Path, target: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-input", "--no-warn-script-location", "--target", str(target),
               "-r", str(req)]
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        if host != self.runtime_python:
            # Wheels for the runtime image's Python, not the worker's.
            cmd += ["--python-version", self.runtime_python, "--only-binary=:all:",
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


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
