"""The local wheel pool compose installs from (TITAN_PIP_FIND_LINKS): each set of
requirements resolves among the wheels downloaded for it alone, so one plugin's wheels
never change what another's requirements install. Real pip in the install sandbox, on
wheels made here (no index)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from manager.core.config import Settings
from manager.plugins.deps import deps_key, install_requirements
from manager.plugins.requirements import parse_requirements

pytestmark = pytest.mark.integration


def make_wheel(pool: Path, name: str, version: str) -> None:
    """A pure-Python wheel whose module says its version."""
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},{len(text)}"  # noqa: E501
              for path, text in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(
        [*record, f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    pool.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(pool / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def test_each_set_of_requirements_installs_from_its_own_wheels(settings: Settings,
                                                               tmp_path: Path) -> None:
    pool = tmp_path / "plugin-wheels"
    pool.mkdir()
    pool.chmod(0o755)
    tmp_path.chmod(0o755)  # the install uid reads the pool by path
    own = settings.with_(pip_find_links=str(pool), cache_dir=tmp_path / "cache").install
    loose = parse_requirements(b"titanpoolpkg\n")  # any version
    pinned = parse_requirements(b"titanpoolpkg==2.0\n")
    make_wheel(pool / deps_key(loose, own), "titanpoolpkg", "1.0")
    make_wheel(pool / deps_key(pinned, own), "titanpoolpkg", "2.0")  # another plugin's
    for reqs, version in ((loose, "1.0"), (pinned, "2.0")):
        site = install_requirements(reqs, own)
        assert (site / "titanpoolpkg" / "__init__.py").read_text() == f"VERSION = {version!r}\n"
