"""The manager process as `make up` runs it: API, listener and metrics in one process;
SIGHUP reloads plugins; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from harness import Bus, free_port, new_id, settings_env, wait_until
from manager.core.config import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]


TOKEN = "manager-service-key"


def get(url: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_manager_serves_reloads_on_sighup_and_stops(settings, conn, registry,
                                                    tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    shutil.copytree(settings.plugins_dir / "echo", plugins / "echo")
    own = settings.with_(plugins_dir=plugins)
    port, metrics_port = free_port(), free_port()
    env = {**settings_env(own), "TITAN_API_PORT": str(port),
           "TITAN_METRICS_PORT": str(metrics_port), "TITAN_API_TOKEN": TOKEN}
    log = (tmp_path / "manager.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "manager"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "manager.log").read_text()
            try:
                return get(f"{api}/health")["status"] == "ok"
            except OSError:
                return False

        wait_until(up, 60, "the manager's API")
        assert [p["name"] for p in get(f"{api}/plugins")["plugins"]] == ["echo"]
        # The listener in that process runs plugins for events on the bus.
        bus = Bus(conn, own)
        event_id = new_id()
        bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "ping"})
        assert bus.result_of(event_id)["event_type"] == "pong"

        shutil.copytree(settings.plugins_dir / "failing", plugins / "failing")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: {p["name"] for p in get(f"{api}/plugins")["plugins"]}
                   == {"echo", "failing"}, 30, "the SIGHUP reload")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            text = resp.read().decode()
        assert 'titan_plugins{status="loaded"} 2.0' in text
        assert 'titan_reloads_total{result="ok"}' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        registry.reload()  # that manager published its own plugin set to the shared registry
    assert code == 0


def test_the_manager_never_serves_without_a_key(settings) -> None:
    env = {**settings_env(settings), "TITAN_API_PORT": str(free_port()),
           "TITAN_METRICS_PORT": str(free_port())}
    env.pop("TITAN_API_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "manager"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "TITAN_API_TOKEN is not set" in proc.stderr and "run/api.token" in proc.stderr
