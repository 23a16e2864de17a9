"""The install sandbox: pip runs here, never as root and never where it could write
outside its own work directory.

Installing a package is running code (a local project's setup.py, a build backend): the
parser in `manager.plugins.requirements` keeps such lines out, and this sandbox makes sure that
a line it missed cannot hurt the host. pip runs

- as `install_uid` (no account, no capabilities, no-new-privs), never uid 0;
- under bubblewrap (`bwrap`, Debian's `bubblewrap`): a private mount namespace that holds
  only `/usr` and the public files of `/etc` that name resolution and TLS need, read-only,
  plus its work directory (read-write, the only writable place besides a private /tmp)
  and, read-only, the operator's local wheel directory. The project, the run directory,
  the caches, Redis's data and the home directories are not in it at all;
- with the system's Python (`/usr/bin/python3`, Debian's `python3-pip`), so nothing of
  the project's own environment has to be visible inside;
- in its own PID, IPC and UTS namespaces, killed with its parent, and in two steps:
  `pip download` (wheels only: nothing of a package runs) shares the host's network to
  reach the operator's index; `pip install --no-index` of those wheels runs in a fresh
  network namespace, with no network at all (no host port, no abstract socket).

Bubblewrap needs to create namespaces. Inside a container that may not (compose's
services run under Docker's default seccomp profile), `install_sandbox = user` runs pip
as `install_uid` without capabilities and relies on the service container as the
boundary; `bwrap` (the default) refuses to install where it cannot build its sandbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from manager.core.errors import DependencyError
from manager.core.groups import InstallSettings

WORK = "/install"  # the work directory, as pip sees it
WHEELS = "/wheels"  # the operator's local wheel directory (TITAN_PIP_FIND_LINKS)
PYTHON = "/usr/bin/python3"
OUTPUT_TAIL = 256 * 1024  # of a step's output, kept: the end says what failed
PUBLIC_ETC = ("resolv.conf", "hosts", "nsswitch.conf", "host.conf", "gai.conf", "services",
              "protocols", "ssl", "ca-certificates", "debian_version", "os-release")
PASS_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
            "no_proxy")
MODES = ("bwrap", "user")


@dataclass(frozen=True)
class Completed:
    returncode: int
    output: str


class InstallSandbox:
    """Runs one pip command in a fresh sandbox over a work directory."""

    def __init__(self, settings: InstallSettings) -> None:
        if settings.install_sandbox not in MODES:
            raise DependencyError(f"TITAN_INSTALL_SANDBOX must be one of {', '.join(MODES)}, "
                                  f"not {settings.install_sandbox!r}")
        if settings.install_uid <= 0:
            raise DependencyError("TITAN_INSTALL_UID must be a uid other than 0")
        self.settings = settings

    @contextlib.contextmanager
    def workspace(self, private_parent: Path) -> Iterator[Path]:
        """A fresh work directory owned by the install user, removed afterwards. Under
        bwrap it lives in the root-only cache (bound into the sandbox, so no other host
        process can reach it); without bwrap the install user must reach it by path, so
        it lives in the system's temporary directory."""
        parent = private_parent if self.settings.install_sandbox == "bwrap" else \
            Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        work = parent / f".install-{secrets.token_hex(8)}"
        try:
            self.prepare(work)
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def put(self, work: Path, name: str, text: str) -> str:
        """Writes a file for pip into the work directory, owned by the install user
        (whatever the process's umask); returns its path as pip sees it."""
        path = work / name
        path.write_text(text)
        os.chown(path, self.settings.install_uid, self.settings.install_uid)
        os.chmod(path, 0o600)
        return f"{self.inside(work)}/{name}"

    def prepare(self, work: Path) -> None:
        """The work directory, owned by the install user and private to it."""
        work.mkdir(mode=0o700)
        (work / "tmp").mkdir(mode=0o700)
        for path in (work, work / "tmp"):
            os.chown(path, self.settings.install_uid, self.settings.install_uid)

    def command(self, argv: list[str], work: Path, network: bool = False) -> list[str]:
        """The full command line: bwrap (or nothing), then setpriv, then `argv`."""
        uid = str(self.settings.install_uid)
        drop = ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
        if self.settings.install_sandbox == "user":
            return [*drop, *argv]
        return [*self._bwrap(work, network), *drop, *argv]

    def _bwrap(self, work: Path, network: bool) -> list[str]:
        argv = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session",
                *([] if network else ["--unshare-net"]),
                "--ro-bind", "/usr", "/usr", "--perms", "0755", "--dir", "/etc"]
        for link in ("bin", "sbin", "lib", "lib64", "lib32"):
            if os.path.islink(f"/{link}"):
                argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        for name in PUBLIC_ETC:
            if os.path.exists(f"/etc/{name}"):
                argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        if self.settings.pip_find_links:
            argv += ["--ro-bind", self.settings.pip_find_links, WHEELS]
        argv += ["--bind", str(work), WORK, "--perms", "0700", "--tmpfs", "/tmp",
                 "--proc", "/proc", "--dev", "/dev", "--chdir", WORK, "--clearenv"]
        for name, value in self.environment(work).items():
            argv += ["--setenv", name, value]
        return [*argv, "--"]

    def inside(self, work: Path) -> str:
        """The work directory as pip sees it."""
        return WORK if self.settings.install_sandbox == "bwrap" else str(work)

    @property
    def wheels(self) -> str:
        """The operator's local wheel directory as pip sees it."""
        return WHEELS if self.settings.install_sandbox == "bwrap" else \
            self.settings.pip_find_links

    def environment(self, work: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in PASS_ENV}
        env.update(HOME=self.inside(work), TMPDIR=f"{self.inside(work)}/tmp",
                   PATH="/usr/bin:/bin", PYTHONNOUSERSITE="1", LANG="C.UTF-8")
        return env

    def pip(self, pip_args: list[str], work: Path, timeout: float,
            network: bool = False) -> Completed:
        """Runs the system's pip; its output is returned, never shown as it is (see
        manager.plugins.deps: only the line naming the failing requirement is). The
        network only for `pip download` (wheels only)."""
        return self.run([PYTHON, "-I", "-m", "pip", *pip_args], work, timeout, network)

    def run(self, argv: list[str], work: Path, timeout: float,
            network: bool = False) -> Completed:
        """Runs `argv` in the sandbox over `work` (tests run hostile code this way), with
        no network unless asked. Without bwrap, one install at a time per host: what one
        leaves running is killed afterwards, and that must never be another's pip."""
        if self.settings.install_sandbox != "user":
            return self._run(argv, work, timeout, network)
        lock = self.settings.cache_dir / "locks" / "install-user.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            return self._run(argv, work, timeout, network)

    def _run(self, argv: list[str], work: Path, timeout: float, network: bool) -> Completed:
        """The step ends when its first process does: what it left running (holding the
        output files or not) is killed then, so its output is read from files, never
        from pipes a leftover could keep open."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(self.command(argv, work, network), stdout=out,
                                        stderr=err, env=self.environment(work), cwd=work)
            except FileNotFoundError as exc:
                raise DependencyError(f"the install sandbox needs {exc.filename} (make up "
                                      "installs bubblewrap and python3-pip)") from None
            try:
                returncode = proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                proc.wait()
                raise DependencyError(f"pip install timed out after {timeout:.0f}s") from exc
            finally:
                if self.settings.install_sandbox == "user":  # no PID namespace ends them
                    kill_all(self.settings.install_uid)
            stdout, stderr = tail(out), tail(err)
        if returncode != 0 and "bwrap:" in stderr and "pip" not in stderr:
            raise DependencyError(f"the install sandbox could not start: "
                                  f"{stderr.strip()[-300:]}")
        return Completed(returncode, stderr + stdout)


def tail(output: IO[bytes], limit: int = OUTPUT_TAIL) -> str:
    """The last `limit` bytes a step wrote (pip's failure is at the end)."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - limit))
    return output.read().decode(errors="replace")


def adopt(tree: Path) -> None:
    """Takes over what the install user wrote (nothing of it runs any more): owned by
    root, directories 0755, files 0644 or 0755; anything but regular files and
    directories is removed. Never follows a symlink."""
    for dirpath, dirnames, filenames in os.walk(tree, followlinks=False):
        os.lchown(dirpath, 0, 0)
        os.chmod(dirpath, 0o755)
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                os.unlink(path)
                continue
            os.lchown(path, 0, 0)
            os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def kill_all(uid: int) -> None:
    """SIGKILLs every process of `uid` in this PID namespace (whatever pip left running)
    before its output is taken over: kill(-1) sent as that uid, which the kernel delivers
    to all of them in one pass that no fork can slip past (a fork that races it is
    undone), where a listing then a kill per process could miss a fast-forking one."""
    child = os.fork()
    if child == 0:  # only system calls here: the parent may have other threads
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with contextlib.suppress(ProcessLookupError):  # none left
                os.kill(-1, signal.SIGKILL)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise DependencyError(f"could not end what the install uid {uid} left running")
