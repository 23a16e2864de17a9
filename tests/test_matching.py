"""Unit tests: trigger matching, host path permissions, plugin output parsing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hoststate import own_prefix

from manager.bus.matching import match
from manager.core.errors import PermissionDenied
from manager.core.events import Event
from manager.core.groups import FsSettings
from manager.core.runs import RunUser
from manager.plugins.loader import PluginEntry, PluginStatus
from manager.plugins.manifest import Manifest
from manager.plugins.permissions import glob_matches, mount_sources, open_payload_path
from workers.classify import OutputError, parse_output


def entry(name: str, *triggers: tuple[str, str], status=PluginStatus.LOADED) -> PluginEntry:
    manifest = Manifest.model_validate_json(json.dumps({
        "name": name, "version": "1.0.0", "entrypoint": "python main.py", "image": "x",
        "triggers": [{"topic": t, "event_type": e} for t, e in triggers]}))
    return PluginEntry(name, status, "/p", "1.0.0", "sha256:x", (), manifest)


def ev(topic: str, event_type: str) -> Event:
    return Event("e1", topic, event_type)


def test_exact_and_glob_triggers() -> None:
    plugins = [entry("exact", ("fs.v1", "file_created")), entry("glob", ("fs.*", "*")),
               entry("all", ("*", "*")), entry("other", ("chat.v1", "user_message"))]
    assert [p.name for p in match(ev("fs.v1", "file_created"), plugins)] == ["all", "exact", "glob"]
    assert [p.name for p in match(ev("fs.v2", "deleted"), plugins)] == ["all", "glob"]
    assert [p.name for p in match(ev("FS.v1", "file_created"), plugins)] == ["all"]


def test_invalid_plugins_never_match() -> None:
    bad = PluginEntry("bad", PluginStatus.INVALID, "/p", errors=("x",))
    assert match(ev("a", "b"), [bad]) == []


def test_glob_semantics() -> None:
    assert glob_matches("/srv/a/b/c.pdf", "/srv/a/**")
    assert glob_matches("/srv/a/c.pdf", "/srv/a/*.pdf")
    assert not glob_matches("/srv/a/b/c.pdf", "/srv/a/*.pdf")
    assert not glob_matches("/srv/ab/c", "/srv/a/**")


# A run's identity (workers.identity hands these out; the kernel judges what it opens).
JUDGE = RunUser(2000123, 2000000)


def _open(path: str | None, globs: list[str], fs: FsSettings) -> str | None:
    checked = open_payload_path({} if path is None else {"path": path}, globs, fs, JUDGE)
    if checked is None:
        return None
    checked.close()
    return checked.path


def test_payload_paths_are_resolved_before_checking(public_dir: Path) -> None:
    fs = FsSettings(allowed_roots=(public_dir,))
    allowed = public_dir / "allowed"
    allowed.mkdir()
    (allowed / "ok.txt").write_text("ok")
    (allowed / "sub").mkdir()
    secret = public_dir / "secret.txt"
    secret.write_text("secret")
    (allowed / "link").symlink_to(secret)
    (allowed / "chain1").symlink_to(allowed / "chain2")
    (allowed / "chain2").symlink_to(secret)
    (allowed / "loop").symlink_to(allowed / "loop")
    os.link(secret, allowed / "hard.txt")
    globs = [f"{allowed}/**"]
    assert _open(str(allowed / "ok.txt"), globs, fs) == str(allowed / "ok.txt")
    assert _open(None, globs, fs) is None
    for bad in [allowed / ".." / "secret.txt", allowed / "link", allowed / "chain1",
                allowed / "loop", allowed / "hard.txt", allowed / "sub", Path("/etc/shadow"),
                "relative.txt"]:
        with pytest.raises(PermissionDenied):
            _open(str(bad), globs, fs)
    # a link is refused as docs/security.md says, even to an allowed file or to nothing,
    # naming the path the event gave and never where it points
    (allowed / "inner").symlink_to(allowed / "ok.txt")
    (allowed / "dangling").symlink_to(allowed / "none.txt")
    (public_dir / "via").symlink_to(allowed)
    for link in ("inner", "dangling", "../via/ok.txt"):
        with pytest.raises(PermissionDenied, match="is a symlink or passes through one") as no:
            _open(str(allowed / link), globs, fs)
        assert "ok.txt'" not in no.value.message.replace(str(allowed / link), "")
    assert _open(str(allowed / "none.txt"), globs, fs) == str(allowed / "none.txt")


def test_payload_path_outside_the_allowed_roots_is_refused(public_dir: Path) -> None:
    (public_dir / "a.txt").write_text("a")
    fs = FsSettings(allowed_roots=(Path("/srv/titan"),))
    with pytest.raises(PermissionDenied, match="outside the plugin's allowed paths"):
        _open(str(public_dir / "a.txt"), [f"{public_dir}/**"], fs)


def test_mount_sources_skip_missing_and_nested(public_dir: Path) -> None:
    fs = FsSettings(allowed_roots=(public_dir,))
    (public_dir / "a" / "b").mkdir(parents=True)
    globs = [f"{public_dir}/a/**", f"{public_dir}/a/b/*.txt", "/nonexistent-titan/**"]
    assert mount_sources(globs, fs, JUDGE) == [f"{public_dir}/a"]


def test_mount_sources_refuse_a_directory_others_could_swap(public_dir: Path) -> None:
    fs = FsSettings(allowed_roots=(public_dir,))
    (public_dir / "open" / "data").mkdir(parents=True)
    (public_dir / "open").chmod(0o777)  # anyone could rename data/ and plant a symlink
    with pytest.raises(PermissionDenied, match="could be swapped"):
        mount_sources([f"{public_dir}/open/data/**"], fs, JUDGE)


@pytest.mark.parametrize(("stdout", "count"), [
    (b"", 0), (b"  \n", 0),
    (b'{"topic": "a", "event_type": "b", "payload": {}}', 1),
    (b'{"topic": "a", "event_type": "b", "payload": {}}\n{"topic": "a", "event_type": "c", '
     b'"payload": {"x": 1}}\n', 2),
])
def test_output_forms(stdout: bytes, count: int) -> None:
    assert len(parse_output(stdout, 100)) == count


@pytest.mark.parametrize(("stdout", "message"), [
    (b"hello", "not JSON"), (b'{"topic": "a"', "not JSON"), (b"\xff\xfe", "not UTF-8"),
    (b'{"topic": "a", "event_type": "b", "payload": NaN}', "NaN is not valid JSON"),
    (b'{"topic": "a"}', "lacks event_type, payload"), (b"[1]", "not a JSON object"),
    (b'{"topic": "a", "event_type": "b", "payload": {}}\n' * 101, "more than the limit"),
    (b'{"topic": "plugins.v1", "event_type": "invocation_failed", "payload": {}}',
     "reserved for the manager's own events"),
    (b'{"topic": "PLUGINS.V1", "event_type": "invocation_failed", "payload": {}}',
     "reserved for the manager's own events"),
    (b'{"topic": "plugins.v1", "event_type": "invocation_failed_x", "payload": {}}',
     "reserved for the manager's own events"),
    ('{"topic": "\uff50lugins.v1", "event_type": "x", "payload": {}}'.encode(),
     "reserved for the manager's own events"),
])
def test_bad_output_is_refused_with_reason(stdout: bytes, message: str) -> None:
    with pytest.raises(OutputError, match=message):
        parse_output(stdout, 100)


@pytest.mark.parametrize("how", ["file 0600", "directory 0700"])
def test_a_payload_its_user_could_not_read_is_refused(public_dir: Path, how: str) -> None:
    fs = FsSettings(allowed_roots=(public_dir,))
    private = public_dir / "private"
    private.mkdir()
    secret = private / "root-only.txt"
    secret.write_text("ROOT-ONLY")
    (secret if how.startswith("file") else private).chmod(int(how.split()[1], 8))
    with pytest.raises(PermissionDenied, match="permission denied") as refused:
        _open(str(secret), [f"{public_dir}/**"], fs)
    assert "ROOT-ONLY" not in refused.value.message
    secret.chmod(0o644)
    private.chmod(0o755)
    assert _open(str(secret), [f"{public_dir}/**"], fs) == str(secret)


def test_a_glob_directory_its_user_could_not_read_is_refused(public_dir: Path) -> None:
    fs = FsSettings(allowed_roots=(public_dir,))
    (public_dir / "closed").mkdir(mode=0o700)
    with pytest.raises(PermissionDenied, match="permission denied"):
        mount_sources([f"{public_dir}/closed/**"], fs, JUDGE)


@pytest.mark.parametrize("denied", ["file", "directory"])
def test_an_acl_entry_denying_the_runs_group_is_obeyed(public_dir: Path, denied: str) -> None:
    """The kernel's verdict, not a re-implementation of it: a 0644 file in a 0755
    directory is refused once an ACL entry denies the runs' group either of them."""
    fs = FsSettings(allowed_roots=(public_dir,))
    shared = public_dir / "shared"
    shared.mkdir(mode=0o755)
    note = shared / "note.txt"
    note.write_text("ACL-PROTECTED")
    note.chmod(0o644)
    assert _open(str(note), [f"{public_dir}/**"], fs) == str(note)
    target = note if denied == "file" else shared
    subprocess.run(["setfacl", "-m", f"g:{JUDGE.gid}:---", str(target)], check=True)
    with pytest.raises(PermissionDenied, match="permission denied") as refused:
        _open(str(note), [f"{public_dir}/**"], fs)
    assert "ACL-PROTECTED" not in refused.value.message
    if denied == "directory":
        with pytest.raises(PermissionDenied, match="permission denied"):
            mount_sources([f"{shared}/**"], fs, JUDGE)


def test_a_payload_over_the_limit_is_refused_by_its_size_sparse_or_not(
        public_dir: Path) -> None:
    fs = FsSettings(allowed_roots=(public_dir,))
    sparse = public_dir / "sparse.bin"
    with sparse.open("wb") as fh:
        fh.truncate(1000 * 2**20)  # 1000 MiB that occupy no block
    assert sparse.stat().st_blocks == 0
    with pytest.raises(PermissionDenied, match=r"1048576000 bytes, over the limit of 134217728"):
        _open(str(sparse), [f"{public_dir}/**"], fs)


def test_a_refusal_names_the_path_the_event_gave_not_where_a_link_points(
        public_dir: Path) -> None:
    fs = FsSettings(allowed_roots=(public_dir,))
    outside = Path(tempfile.mkdtemp(prefix=own_prefix("elsewhere"), dir="/var/tmp"))
    try:
        (public_dir / "link").symlink_to(outside / "target.txt")
        with pytest.raises(PermissionDenied) as refused:
            _open(str(public_dir / "link"), [f"{public_dir}/**"], fs)
        assert str(outside) not in refused.value.message, refused.value.message
        assert str(public_dir / "link") in refused.value.message
    finally:
        shutil.rmtree(outside)
