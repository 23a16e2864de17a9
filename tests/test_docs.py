"""Every command in README.md and docs/, run as written, in the order a reader meets them.

They run in a private copy of the project (its own `plugins/` and `run/`), whose README
`make up` starts a stack of its own: its own Redis, manager, workers and Flower, in a
network namespace of their own, so `localhost:8003` there is that stack's and never the
machine's. Shell blocks (```bash, ```sh) run with `bash -e -o pipefail`; a Python block is
a service, run until it has printed what it is for, then stopped as a user stops it
(Ctrl-C). A block that cannot run here is named in ELSEWHERE with what runs it instead.
The namespace has no route out, so the wheels its plugins' requirements name are fetched
beforehand into a local directory (TITAN_PIP_FIND_LINKS), as `make compose-up` does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hoststate import MARK, claim, own_id

from harness import session_dir, wait_until
from manager.core.config import ROOT

pytestmark = pytest.mark.integration
DOCS = ("README.md", "docs/plugins.md", "docs/operations.md", "docs/configuration.md",
        "docs/architecture.md", "docs/delivery.md", "docs/security.md")
SHELL = {"bash", "sh"}
FILES_ROOT = Path("/srv/titan")
# Blocks not run here (by their first command), and what runs them instead.
ELSEWHERE = {
    "make test": "the suite itself: CI (.ci/run) runs it",
    "TITAN_REDIS_BIND=10.0.0.5 make up": "binds an address of another network; "
    "tests/test_worker_hosts.py serves Redis to a second engine's worker",
    "git clone <this repository> titan && cd titan": "a second machine; "
    "tests/test_worker_hosts.py starts a worker host on a second Docker engine",
    'TITAN_EGRESS_ALLOW="hooks.example.com:443" make up': "names a host on the internet, "
    "and the proxy listens on a Docker bridge of the host, outside this test's network "
    "namespace; tests/test_egress.py runs the same path against local servers named by "
    "TITAN_EGRESS_HOSTS, on all four lanes",
    "make tls-check": "needs Redis with TLS (TITAN_REDIS_BIND); tests/test_tls_rotation.py "
    "runs this block as written against one, a worker host writing throughout",
}
# What a reader sees from a block (by the start of its first command), beyond its exit
# status 0.
EXPECT = {
    "python3 titan-plugins.py list": ["shell_runner", "status succeeded", "file_text_extracted",
                                      "Some *markdown*", '"redis"'],
    "python3 titan-plugins.py publish --wait -e '{\"topic\": \"system.v1\"": [
        "shell_runner: succeeded", "\"refused\": false"],
    "python3 titan-plugins.py new greeter --topic chat.v1 --event-type user_message": [
        "README.md): draft", "added: greeter 0.1.0", "status succeeded",
        "user_message_handled"],
    "python3 titan-plugins.py new word_count --topic chat.v1 --event-type user_message": [
        '"words": 3', "word_count"],
    "sed -i 's/^version: 0.1.0/version: 0.2.0/'": ["updated: word_count 0.1.0", "* ",
                                                   "0.1.0 (rolled back)"],
    "cp -r plugins/shell_runner plugins/disk_report": [
        "*/5 * * * * (UTC), next 3", "added: disk_report 1.0.0",
        "timer '*/5 * * * *', next ", "status succeeded", "Filesystem"],
    "import json": ["plugin:shell_runner@", "system.v1/cmd_result"],
    "export REDISCLI_AUTH=\"$(sed -E 's|.*://[^:]*:([^@]*)@.*|\\1|' run/redis.url)\"": [
        "titan:events", "event"],
    "python3 titan-plugins.py health": ["redis", "worker1: running"],
    "python3 titan-plugins.py validate plugins/word_count": ["word_count: loaded 0.2.0",
                                                             "greeter       loaded"],
    "python3 titan-plugins.py logs word_count -n 3": ["succeeded", "chat.v1/word_count"],
    "docker info --format '{{json .Runtimes}}'": ["runsc"],
    "curl -s http://localhost:8003/health": ['"invocations"', '"succeeded"'],
    "curl -s http://localhost:8004/metrics | grep '^titan_invocations_total'": [
        'plugin="word_count",status="succeeded"', "Flower: http://127.0.0.1:5555"],
}


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    text: str

    @property
    def first(self) -> str:
        """Its first command, without a trailing comment: the block's name here."""
        line = next(ln for ln in self.text.splitlines() if ln.strip())
        return re.split(r"\s+# ", line)[0].strip()


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of a Markdown file, indentation (inside list items) removed."""
    found, current, lines = [], None, (ROOT / doc).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        fence = re.fullmatch(r"(\s*)```(\w*)\s*", line)
        if current is None and fence:
            current = (n, fence.group(1), fence.group(2), [])
        elif current is not None and fence and not fence.group(2):
            start, indent, lang, body = current
            found.append(Block(doc, start, lang, "\n".join(
                b[len(indent):] if b.startswith(indent) else b for b in body) + "\n"))
            current = None
        elif current is not None:
            current[3].append(line)
    assert current is None, f"{doc}:{current and current[0]}: a block that never closes"
    return found


def commands() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc) if b.lang in SHELL | {"python"}]


def test_every_block_is_run_here_or_named_with_what_runs_it() -> None:
    found = {b.first for b in commands()}
    assert set(ELSEWHERE) <= found, f"named but gone from the docs: {set(ELSEWHERE) - found}"
    stale = [key for key in EXPECT if not any(f.startswith(key) for f in found)]
    assert stale == [], f"expected output of blocks not in the docs: {stale}"
    first = commands()[0]
    assert (first.doc, first.text) == ("README.md", "make up\n"), first
    unlabelled = [f"{b.doc}:{b.line}" for doc in DOCS for b in blocks(doc)
                  if not b.lang and b.text.lstrip().startswith(("python3 ", "make ", "curl "))]
    assert unlabelled == [], f"commands in blocks without a language: {unlabelled}"


class Checkout:
    """A copy of the project's files (tracked and new, not ignored) with the project's
    virtualenv, and a network namespace held by one process, its loopback up."""

    def __init__(self) -> None:
        self.dir = session_dir() / f"docs-{uuid.uuid4().hex[:8]}"
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
                    MARK: os.environ[MARK], "TITAN_INSTANCE": f"docs-{own_id()}"}
        self.holder: subprocess.Popen | None = None

    def start(self) -> None:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached",
                                 "--others", "--exclude-standard"], capture_output=True,
                                check=True).stdout.decode().split("\0")
        for rel in filter(None, listed):
            source = ROOT / rel
            if source.is_file() and not rel.startswith(("run/", "build/")):
                (self.dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, self.dir / rel)
        (self.dir / ".venv").symlink_to(ROOT / ".venv")
        wheels = self.dir / "build" / "plugin-wheels"
        subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "manager.plugins.deps",
                        str(self.dir / "plugins"), str(wheels)], cwd=self.dir, check=True,
                       env={**self.env, "TITAN_RUN_DIR": str(self.dir / "run")},
                       capture_output=True, timeout=600)
        self.env["TITAN_PIP_FIND_LINKS"] = str(wheels)
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep infinity"],
            env=self.env)
        wait_until(lambda: self.run_shell("ip -br link show lo", 10).stdout.find("UP") >= 0,
                   10, "the namespace's loopback")

    def enter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]

    def run_shell(self, text: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([*self.enter(), "bash", "-e", "-o", "pipefail", "-c", text],
                              cwd=self.dir, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def run_service(self, text: str, expect: list[str], timeout: float) -> tuple[int, str]:
        """A Python block that serves until Ctrl-C: stopped once it printed what it is for."""
        # Ctrl-C as a user's terminal gives it: a suite started in the background by a
        # shell without job control inherits SIGINT ignored, and Python keeps it so.
        proc = subprocess.Popen([*self.enter(), str(ROOT / ".venv/bin/python"), "-c", text],
                                cwd=self.dir, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append(line)
                if all(any(e in s for s in seen) for e in expect):
                    break
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=timeout)  # what it said on its way out too
            return proc.returncode, "".join(seen) + (rest or "")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        if (self.dir / "run").exists() and self.holder is not None:
            self.run_shell("make down", 180)
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def tree(root: Path) -> set[Path]:
    return {root, *root.rglob("*")} if root.exists() else set()


@pytest.fixture(scope="module")
def checkout() -> Iterator[Checkout]:
    before = tree(FILES_ROOT)
    made = Checkout()
    try:
        made.start()
        yield made
    finally:
        made.stop()
        left = sorted(tree(FILES_ROOT) - before, key=lambda p: len(p.parts), reverse=True)
        claim(left)  # README's names: the host check holds the suite to removing them
        for path in left:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.mark.parametrize("doc", DOCS)
def test_the_commands_of(doc: str, checkout: Checkout) -> None:
    """Each block of `doc` as written, after the blocks of the documents before it."""
    for block in (b for b in commands() if b.doc == doc):
        if block.first in ELSEWHERE:
            continue
        expect = [e for key, said in EXPECT.items() if block.first.startswith(key)
                  for e in said]
        if block.lang == "python":
            status, out = checkout.run_service(block.text, expect, timeout=60)
        else:
            done = checkout.run_shell(block.text, timeout=600)
            status, out = done.returncode, done.stdout + done.stderr
        where = f"{doc}:{block.line} ({block.first})"
        print(f"=== {where}\n{out}")
        assert status == 0, f"{where} exited {status}:\n{out[-4000:]}"
        missing = [e for e in expect if e not in out]
        assert not missing, f"{where} did not show {missing}:\n{out[-4000:]}"
