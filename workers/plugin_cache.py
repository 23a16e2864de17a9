"""A worker host's local copies: plugin code by digest, requirements by content.

Code comes from the bundle in Redis (no shared filesystem with the manager). The bundle
is trusted for nothing: the digest is validated before any path is built, the bundle is
unpacked with a size bound and checked against the digest, and only regular files and
directories with plain relative names are written, each created with O_EXCL/O_NOFOLLOW
under a fresh private directory. requirements.txt goes through the same rules as reload.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from manager.core.errors import BundleError
from manager.core.run_groups import CacheSettings
from manager.plugins.deps import install_requirements, touch
from manager.plugins.loader import REQUIREMENTS
from manager.plugins.registry import Registry
from manager.plugins.requirements import parse_requirements
from manager.plugins.safefs import (
    O_DIR,
    UnsafePath,
    bundle_members,
    fd,
    gunzip_bounded,
    locked,
    mkdirs,
    private_root,
    read_regular,
    write_tree,
)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise BundleError(f"invalid digest {str(digest)[:80]!r}", digest=str(digest)[:80])
    return digest


class PluginCache:
    def __init__(self, registry: Registry | None, settings: CacheSettings) -> None:
        self.registry = registry
        self.settings = settings

    @property
    def root(self) -> Path:
        return private_root(self.settings.dir)

    def code_dir(self, digest: str, bundle: bytes | None = None) -> Path:
        """The unpacked plugin for a digest: from `bundle` when given (a local run), else
        fetched from Redis when absent here."""
        target = self.root / "plugins" / check_digest(digest).replace(":", "-")
        with locked(self.root / "locks" / f"{target.name}.lock"):  # the janitor's lock too
            if target.is_dir():
                touch(target)
                return target
            if bundle is None and self.registry is not None:
                bundle = self.registry.bundle(digest)
            if bundle is None:
                raise BundleError(f"bundle {digest} is not in the store", digest=digest)
            self._unpack(bundle, digest, target)
        return target

    def _unpack(self, bundle: bytes, digest: str, target: Path) -> None:
        limit = self.settings.max_bundle_bytes * 2  # tar headers add to the files' size
        try:
            tar_bytes = gunzip_bounded(bundle, limit)
            actual = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
            if actual != digest:
                raise BundleError(f"bundle content {actual} does not match {digest}",
                                  digest=digest)
            tmp = Path(tempfile.mkdtemp(dir=mkdirs(target.parent, 0o700)))
            try:
                with fd(os.open(tmp, O_DIR)) as root:
                    write_tree(root, bundle_members(tar_bytes, self.settings.max_bundle_bytes))
                os.chmod(tmp, 0o755)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        except (UnsafePath, OSError, EOFError, tarfile.TarError, zlib.error,
                UnicodeError, ValueError) as exc:  # a crafted bundle: a plain reason
            raise BundleError(f"bundle {digest} refused: {_plain(exc)}", digest=digest) from None

    def deps_dir(self, code_dir: Path) -> Path | None:
        """Installs requirements.txt (if any) by the same rules as reload."""
        try:
            with fd(os.open(code_dir, O_DIR)) as handle:
                data, _ = read_regular(handle, REQUIREMENTS, self.settings.max_bundle_bytes,
                                       REQUIREMENTS)
        except FileNotFoundError:
            return None
        except UnsafePath as exc:
            raise BundleError(f"{REQUIREMENTS}: {exc.reason}") from None
        return install_requirements(parse_requirements(data), self.settings.install)


def _plain(exc: BaseException) -> str:
    """What was wrong with a bundle, in words (file names in it are shown escaped)."""
    if isinstance(exc, UnicodeError):
        return "a member name is not valid UTF-8"
    if isinstance(exc, FileExistsError | NotADirectoryError | IsADirectoryError):
        return f"a member clashes with another ({exc.strerror}: {exc.filename!r:.120})"
    return str(exc)[:300]
