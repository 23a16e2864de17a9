"""Filesystem access that checks and uses the same object.

Paths come from hostile places (plugin directories, events, bundles in Redis). So every
path is walked one component at a time relative to an open directory, with O_NOFOLLOW,
and what `fstat` checked is what gets read, copied or written. Nothing here reads a path
a second time, and nothing follows a symlink.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from manager.core.errors import TitanError

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
NAME_RE = re.compile(r"^[A-Za-z0-9_.@+=,-]{1,128}$")  # one path component we accept
SKIP_NAMES = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
MAX_DEPTH = 16


class UnsafePath(TitanError, ValueError):
    """A path or file that may not be used; `reason` is safe to show (never file content).
    (A ValueError too: callers that take a bad name as a bad value still catch it.)"""

    code = "unsafe_path"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}", path=path, reason=reason)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class TreeLimits:
    max_bytes: int
    max_files: int


@dataclass(frozen=True)
class TreeFile:
    """One regular file of a plugin directory, read through the descriptor that was checked."""

    path: str  # relative, '/'-separated
    data: bytes
    executable: bool


@contextmanager
def fd(value: int) -> Iterator[int]:
    try:
        yield value
    finally:
        os.close(value)


def _component(name: str, where: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise UnsafePath(where, f"invalid path component {name!r}")


def open_path(path: str) -> int:
    """Opens an absolute path with O_PATH, refusing a symlink anywhere on the way.

    The caller owns the returned descriptor; it names exactly the object that was walked
    to, whatever is renamed or swapped afterwards. (Whether a run may read it is the
    kernel's to say: manager.plugins.as_user.)"""
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        raise UnsafePath(path, "not an absolute path")
    current = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = pure.parts[1:]
        for n, part in enumerate(parts):
            _component(part, path)
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            os.close(current)
            current = nxt
            mode = os.fstat(current).st_mode
            if stat.S_ISLNK(mode):
                raise UnsafePath(path, f"{'/'.join(parts[:n + 1])} is a symlink")
            if n < len(parts) - 1 and not stat.S_ISDIR(mode):
                raise UnsafePath(path, f"{'/'.join(parts[:n + 1])} is not a directory")
    except FileNotFoundError:
        os.close(current)
        raise
    except OSError as exc:
        os.close(current)
        raise UnsafePath(path, exc.strerror or "cannot be opened") from None
    except UnsafePath:
        os.close(current)
        raise
    return current


def copy_fd(src_fd: int, dst_path: str, size: int, owner: tuple[int, int] | None = None
            ) -> None:
    """Copies `size` bytes from `src_fd` into a new file (kernel-side copy), readable by
    its `owner` (uid, gid) alone, or by everyone when none is given."""
    with fd(os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                    | os.O_CLOEXEC, 0o600)) as out:
        copied = 0
        while copied < size:
            n = os.copy_file_range(src_fd, out, size - copied, offset_src=copied)
            if n == 0:
                raise UnsafePath("payload", "the file shrank while it was copied")
            copied += n
        if owner is not None:
            os.fchown(out, *owner)
            os.fchmod(out, 0o400)
        else:
            os.fchmod(out, 0o444)


def _is_sparse(handle: int, size: int) -> bool:
    try:
        return size > 0 and os.lseek(handle, 0, os.SEEK_HOLE) < size
    except OSError:  # a filesystem without SEEK_HOLE reports no holes
        return False


def read_regular(dir_fd: int, name: str, max_bytes: int,
                 where: str) -> tuple[bytes, os.stat_result]:
    """Reads one regular, single-link, non-sparse file of at most `max_bytes`, sized from
    `fstat` before a byte is read. Returns (data, its stat)."""
    _component(name, where)
    try:
        handle = os.open(name, O_FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnsafePath(where, exc.strerror or "cannot be opened") from None
    with fd(handle):
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(where, "not a regular file")
        if st.st_nlink != 1:
            raise UnsafePath(where, f"has {st.st_nlink} hard links; plugins may not hold "
                                    "hardlinked files")
        if st.st_size > max_bytes:
            raise UnsafePath(where, f"is {st.st_size} bytes, over the limit of {max_bytes}")
        if _is_sparse(handle, st.st_size):
            raise UnsafePath(where, "is a sparse file; plugins may not hold sparse files")
        chunks, offset = [], 0
        while offset < st.st_size:
            chunk = os.pread(handle, min(st.st_size - offset, 1 << 20), offset)
            if not chunk:
                raise UnsafePath(where, "shrank while it was read")
            chunks.append(chunk)
            offset += len(chunk)
        if os.pread(handle, 1, offset):
            raise UnsafePath(where, "grew while it was read")
        return b"".join(chunks), st


def open_subdir(dir_fd: int, name: str, where: str) -> int:
    """Opens a directory entry as a directory, refusing a symlink."""
    _component(name, where)
    try:
        return os.open(name, O_DIR, dir_fd=dir_fd)
    except OSError as exc:
        refused = exc.errno in (errno.ELOOP, errno.ENOTDIR)
        raise UnsafePath(where, "not a directory (symlinks are refused)" if refused
                         else exc.strerror or "cannot be opened") from None


def read_tree(dir_fd: int, limits: TreeLimits) -> list[TreeFile]:
    """Every regular file under an open directory, sorted by path; refuses symlinks,
    devices, fifos, sockets, hardlinks and sparse files, and stops at the limits before
    reading past them."""
    files: list[TreeFile] = []
    budget = [limits.max_bytes]
    _walk(dir_fd, "", files, budget, limits, 0)
    return sorted(files, key=lambda f: f.path)


def _walk(dir_fd: int, prefix: str, files: list[TreeFile], budget: list[int],
          limits: TreeLimits, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsafePath(prefix, f"nests deeper than {MAX_DEPTH} directories")
    with os.scandir(dir_fd) as entries:
        names = sorted((e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in entries)
    for name, is_link, is_dir in names:
        rel = f"{prefix}{name}"
        if name in SKIP_NAMES or name.endswith(".pyc"):
            continue
        if is_link:
            raise UnsafePath(rel, "is a symlink; plugins may not contain symlinks")
        if is_dir:
            with fd(open_subdir(dir_fd, name, rel)) as sub:
                _walk(sub, rel + "/", files, budget, limits, depth + 1)
            continue
        if len(files) >= limits.max_files:
            raise UnsafePath(rel, f"more than {limits.max_files} files")
        data, st = read_regular(dir_fd, name, budget[0], rel)
        budget[0] -= len(data)
        files.append(TreeFile(rel, data, bool(st.st_mode & 0o111)))


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


def gunzip_bounded(data: bytes, max_bytes: int) -> bytes:
    """gzip.decompress that stops at `max_bytes` instead of filling memory."""
    inflater = zlib.decompressobj(wbits=31)
    out = inflater.decompress(data, max_bytes + 1)
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise UnsafePath("bundle", f"unpacks to more than {max_bytes} bytes")
    return out


def bundle_members(tar_bytes: bytes, max_bytes: int) -> Iterator[tuple[str, bool, bytes | None]]:
    """Yields (relative path, executable, data or None for a directory) from a bundle tar,
    accepting only what `build_bundle` writes: regular files and directories with plain
    relative names. Anything else raises UnsafePath."""
    total = 0
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for member in tar:
            name = member.name
            parts = name.split("/")
            if name.startswith("/") or any(not NAME_RE.fullmatch(p) or p in (".", "..")
                                           for p in parts) or len(parts) > MAX_DEPTH:
                raise UnsafePath(name[:200], "bundle member name is not a plain relative path")
            if member.isdir():
                yield name, False, None
                continue
            if not member.isreg():
                raise UnsafePath(name, "bundle member is not a regular file or directory")
            total += member.size
            if total > max_bytes:
                raise UnsafePath(name, f"bundle is larger than {max_bytes} bytes")
            handle = tar.extractfile(member)
            data = handle.read() if handle else b""
            yield name, bool(member.mode & 0o111), data


def write_tree(root_fd: int, members: Iterator[tuple[str, bool, bytes | None]]) -> None:
    """Creates files and directories under an open, empty, private directory; every
    component is created or opened relative to its parent with O_NOFOLLOW/O_EXCL."""
    for name, executable, data in members:
        *dirs, leaf = name.split("/")
        parent = os.dup(root_fd)
        try:
            for part in dirs if data is not None else [*dirs, leaf]:
                with suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=parent)
                nxt = os.open(part, O_DIR, dir_fd=parent)
                os.close(parent)
                parent = nxt
                os.fchmod(parent, 0o755)  # whatever the process's umask: the sandbox reads it
            if data is None:
                continue
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with fd(os.open(leaf, flags, 0o755 if executable else 0o644, dir_fd=parent)) as out:
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
                os.fchmod(out, 0o755 if executable else 0o644)
        finally:
            os.close(parent)
