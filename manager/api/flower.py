"""Flower behind the front: `python -m manager.api.flower --address=H --port=P [flower
options]` runs Flower on a private unix socket and the TCP front (manager.api.front:
deadlines for a request's head and body, one request per connection, a cap per local
account) on H:P in front of it.

Flower's tornado server keeps every connection a client opens for as long as the client
keeps sending, so a thousand slow clients of one account could hold its port (issue 44);
behind the front they cannot. Flower is this process's child: it ends when Flower does,
and a SIGTERM or SIGINT here stops Flower first."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from manager.api.front import Front
from manager.core.config import Settings

READY_S = 60  # Flower's first start imports Celery's app and connects to the broker


def arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m manager.api.flower")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--socket", type=Path, default=None,
                        help="Flower's unix socket (default: a private directory of its own)")
    return parser.parse_known_args(argv)


def wait_for_socket(path: Path, flower: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_S
    while not path.exists():
        if flower.poll() is not None:
            sys.exit(f"Flower ended before it listened (exit {flower.returncode})")
        if time.monotonic() > deadline:
            flower.terminate()
            sys.exit(f"Flower did not listen on {path} within {READY_S} s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    args, rest = arguments(sys.argv[1:] if argv is None else argv)
    private = Path(tempfile.mkdtemp(prefix="flower-"))  # 0700: ours alone
    sock = args.socket or private / "flower.sock"
    sock.unlink(missing_ok=True)
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.celery_app",
                               "flower", f"--unix_socket={sock}", *rest])
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: flower.terminate())
    try:
        wait_for_socket(sock, flower)
        sock.chmod(0o600)  # Flower makes it 0777; its directory kept others out meanwhile
        front = Front(Settings.from_env().api, str(sock), args.address, args.port, name="flower")
        front.start()
        try:
            return flower.wait()
        finally:
            front.stop()
    finally:
        if flower.poll() is None:
            flower.terminate()
            flower.wait()
        sock.unlink(missing_ok=True)
        os.rmdir(private)


if __name__ == "__main__":
    sys.exit(main())
