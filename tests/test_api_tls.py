"""HTTPS on the API's port (TITAN_API_TLS=1), a real manager process: the CLI verifies the
certificate against the project's CA and only then sends the key; a server with another
CA's certificate is refused and receives nothing; plain HTTP to the port gets nothing;
connections that never finish their handshake hold no thread (the CLI is still served)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import free_port, run_cli, settings_env, wait_until
from manager.core import certs
from manager.core.certs import Kind
from manager.core.config import ROOT
from redis_nodes import Impostor, project_ca

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]
TOKEN = "api-tls-key"


@pytest.fixture
def https_api(settings, registry, tmp_path: Path) -> Iterator[str]:
    ca = project_ca()
    cert = certs.issue(ca, Kind.SERVER, "api", ["127.0.0.1", "localhost"])
    plugins = tmp_path / "plugins"
    shutil.copytree(settings.plugins_dir / "echo", plugins / "echo")
    own = settings.with_(plugins_dir=plugins, run_dir=tmp_path / "run")
    port = free_port()
    env = {**settings_env(own), "TITAN_API_PORT": str(port), "TITAN_API_TLS": "1",
           "TITAN_API_TLS_CERT": str(cert), "TITAN_API_TLS_KEY": str(cert.with_suffix(".key")),
           "TITAN_METRICS_PORT": str(free_port()), "TITAN_API_TOKEN": TOKEN}
    log = tmp_path / "manager.log"
    proc = subprocess.Popen([sys.executable, "-m", "manager"], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and verified(url).returncode == 0, 60,
                   "the manager's HTTPS API")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        registry.reload()  # that manager published its own plugin set to the shared registry


def verified(url: str, ca: Path | None = None, *args: str) -> subprocess.CompletedProcess:
    ca = ca or project_ca() / "trust.crt"
    return run_cli(url, *(args or ("health",)), TITAN_API_CA=str(ca), TITAN_API_TOKEN=TOKEN)


def test_the_cli_verifies_the_api_and_then_sends_its_key(https_api: str,
                                                         tmp_path: Path) -> None:
    listed = verified(https_api, None, "list")
    assert listed.returncode == 0 and "echo" in listed.stdout, listed.stderr
    other = tmp_path / "other"
    certs.new_ca(other)
    refused = verified(https_api, other / "trust.crt", "list")
    assert refused.returncode == 4 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr, \
        refused.stderr
    with pytest.raises(OSError):  # plain HTTP on the HTTPS port gets no answer
        urllib.request.urlopen(https_api.replace("https://", "http://") + "/health", timeout=5)


def test_a_server_with_another_cas_certificate_receives_nothing(tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.new_ca(other)
    impostor = Impostor(certs.issue(other, Kind.SERVER, "api", ["127.0.0.1"]))
    try:
        result = verified(f"https://127.0.0.1:{impostor.port}", None, "list")
    finally:
        impostor.close()
    assert result.returncode == 4, result.stderr
    assert impostor.handshakes == 0 and TOKEN.encode() not in impostor.received


def test_unfinished_handshakes_hold_no_thread(https_api: str) -> None:
    port = int(https_api.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    try:
        served = verified(https_api, None, "list")
        assert served.returncode == 0 and "echo" in served.stdout, served.stderr
    finally:
        for sock in held:
            sock.close()
