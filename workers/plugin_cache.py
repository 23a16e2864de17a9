"""A worker host's local copies: plugin code by digest, requirements by content.

Code comes from the bundle in Redis (no shared filesystem with the manager), is checked
against its digest, and is unpacked once per host; requirements.txt is installed once per
distinct content with pip outside the container, then mounted read-only into it.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path

from manager.config import Settings
from manager.deps import install_requirements, locked, mkdirs, readable_tree
from manager.errors import BundleError
from manager.registry import Registry, bundle_digest


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
        with locked(self.root / "locks" / f"{target.name}.lock"):
            if target.is_dir():
                return target
            bundle = self.registry.bundle(digest)
            if bundle is None:
                raise BundleError(f"bundle {digest} is not in the store", digest=digest)
            actual = bundle_digest(bundle)
            if actual != digest:
                raise BundleError(f"bundle content {actual} does not match {digest}",
                                  digest=digest)
            tmp = Path(tempfile.mkdtemp(dir=mkdirs(target.parent)))
            with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
                tar.extractall(tmp, filter="data")
            readable_tree(tmp)
            os.rename(tmp, target)
        return target

    def deps_dir(self, code_dir: Path) -> Path | None:
        """Installs requirements.txt (if any) into a directory keyed by its content."""
        req = code_dir / "requirements.txt"
        return install_requirements(req, self.root, self.runtime_python) if req.is_file() \
            else None
