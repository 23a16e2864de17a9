"""The compose deployment, for real: images built here with no registry, a private project
(name, ports, manager container name, directories) so it never meets a user's stack, 3
worker containers, the seed's `docker exec <manager> kill -HUP 1`, a worker container
killed mid-burst with nothing lost, and nothing left behind after `down`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import free_port, http_status, wait_until
from manager.core.config import ROOT

pytestmark = pytest.mark.integration
ACTIVE = ("pending", "queued", "throttled", "running", "retrying")


def has_pip(image: str) -> bool:
    return subprocess.run(["docker", "run", "--rm", "--network", "none", image, "python3",
                           "-m", "pip", "--version"], capture_output=True,
                          check=False).returncode == 0


class ComposeStack:
    """A compose project of the test's own: name, ports, directories, env file, and its
    own service image (removed afterwards; a user's `titan-plugin-manager:local` is never
    rebuilt). A base image the host already has is used as it is; else one is built under
    the test's own name and removed afterwards."""

    def __init__(self, tmp: Path) -> None:
        uid = uuid.uuid4().hex[:8]
        self.project = f"titantest{uid}"
        self.manager = f"{self.project}-manager"
        self.plugins = tmp / "plugins"
        shutil.copytree(ROOT / "plugins" / "shell_runner", self.plugins / "shell_runner")
        self.workers_dir = Path(f"/var/lib/titan/test-{uid}")
        self.port = free_port()
        self.env_file = tmp / "compose.env"
        self.service_image = f"titan-plugin-manager:test-{uid}"
        self.base_image = ("titan-base:bookworm" if has_pip("titan-base:bookworm")
                           else f"titan-base:test-{uid}")
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("TITAN_")},
                    "TITAN_COMPOSE_ENV_FILE": str(self.env_file),
                    "TITAN_COMPOSE_RUN_DIR": str(tmp / "compose-run"),
                    "TITAN_SERVICE_IMAGE": self.service_image,
                    "TITAN_BASE_IMAGE": self.base_image,
                    "TITAN_COMPOSE_PROJECT": self.project, "TITAN_MANAGER_NAME": self.manager,
                    "TITAN_API_PORT": str(self.port), "TITAN_METRICS_PORT": str(free_port()),
                    "TITAN_FLOWER_PORT": str(free_port()),
                    "TITAN_WORKERS_DIR": str(self.workers_dir),
                    "TITAN_PLUGINS_HOST_DIR": str(self.plugins),
                    "TITAN_VISIBILITY_TIMEOUT": "10", "TITAN_RESTORE_INTERVAL": "2"}

    def script(self, action: str) -> None:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "compose.sh"), action],
                              env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def secret(self, name: str) -> str:
        """A secret compose.sh generated into the project's env file."""
        lines = self.env_file.read_text().splitlines()
        return next(ln.split("=", 1)[1] for ln in lines if ln.startswith(f"{name}="))

    @property
    def token(self) -> str:
        return self.secret("TITAN_API_TOKEN")

    def remove_images(self) -> None:
        """The images built for this project only (the stamp file goes with them)."""
        mine = [self.service_image] + ([self.base_image] if "test-" in self.base_image else [])
        subprocess.run(["docker", "rmi", "-f", *mine], capture_output=True, check=False)
        stamp = self.service_image.replace(":", "_").replace("/", "_")
        (ROOT / "build" / f".service-stamp-{stamp}").unlink(missing_ok=True)

    def api(self, method: str, path: str, body: object = None, token: str | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method, headers={
                                         "Content-Type": "application/json",
                                         "Authorization": f"Bearer {token or self.token}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())

    def docker(self, *args: str) -> str:
        return subprocess.run(["docker", *args], capture_output=True, text=True,
                              check=True).stdout

    def records(self, plugin: str) -> list[dict]:
        return self.api("GET", f"/plugins/{plugin}/invocations?limit=200")["invocations"]

    def burst(self, n: int) -> list[str]:
        ids = [f"compose-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        for event_id in ids:
            self.api("POST", "/events", {"event_id": event_id, "topic": "system.v1",
                                         "event_type": "run_cmd",
                                         "payload": {"command": "echo spread"}})
        return ids

    def finished(self, ids: list[str], timeout: float = 180) -> list[dict]:
        def done() -> list[dict] | None:
            mine = [r for r in self.records("shell_runner") if r["event_id"] in ids]
            ok = len({r["event_id"] for r in mine}) == len(ids) and all(
                r["status"] not in ACTIVE for r in mine)
            return mine if ok else None

        return wait_until(done, timeout, f"{len(ids)} shell_runner runs to finish")


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    stack = ComposeStack(tmp_path_factory.mktemp("compose"))
    try:
        stack.script("up")
        yield stack
    finally:
        stack.script("down")
        stack.remove_images()
        left = stack.docker("ps", "-aq", "--filter",
                            f"label=com.docker.compose.project={stack.project}")
        left += stack.docker("ps", "-aq", "--filter",
                             f"label=titan.instance=compose-{stack.project}")
        networks = stack.docker("network", "ls", "-q", "--filter", f"name={stack.project}")
        volumes = stack.docker("volume", "ls", "-q", "--filter", f"name={stack.project}")
        shutil.rmtree(stack.workers_dir, ignore_errors=True)
        assert not (left.strip() or networks.strip() or volumes.strip()), (left, networks,
                                                                          volumes)


def test_runs_spread_over_the_worker_containers(compose: ComposeStack) -> None:
    health = compose.api("GET", "/health")
    assert health["workers"]["count"] == 3 and health["docker"]["ok"], health
    with pytest.raises(urllib.error.HTTPError) as refused:  # the API needs its key
        compose.api("GET", "/plugins", token="not-the-key")
    assert refused.value.code == 401
    flower = (f"http://127.0.0.1:{compose.env['TITAN_FLOWER_PORT']}/tasks/datatable?draw=1"
              "&start=0&length=10&order%5B0%5D%5Bcolumn%5D=0&columns%5B0%5D%5Bdata%5D=name")
    login = compose.secret("TITAN_FLOWER_AUTH")
    wait_until(lambda: http_status(flower, login) == 200, 60, "Flower behind its login")
    assert http_status(flower) == 401
    runs = compose.finished(compose.burst(12))
    assert {r["status"] for r in runs} == {"succeeded"} and len(runs) == 12
    assert len({r["worker"] for r in runs}) >= 2, {r["worker"] for r in runs}


def test_sighup_to_pid_1_of_the_manager_reloads_plugins_edited_on_the_host(
        compose: ComposeStack) -> None:
    assert compose.docker("exec", compose.manager, "cat", "/proc/1/comm").strip() == "python3"
    d = compose.plugins / "hello_compose"
    d.mkdir()
    (d / "plugin.yaml").write_text(
        "name: hello_compose\nversion: 1.0.0\ntriggers: [{topic: hello.v1, event_type: hi}]\n"
        "entrypoint: python main.py\nimage: titan-runtime:py3.11\n")
    (d / "main.py").write_text('print(\'{"topic": "hello.v1", "event_type": "hello", '
                               '"payload": {"from": "compose"}}\')\n')
    compose.docker("exec", compose.manager, "kill", "-HUP", "1")
    wait_until(lambda: any(p["name"] == "hello_compose" and p["status"] == "loaded"
                           for p in compose.api("GET", "/plugins")["plugins"]), 30,
               "the SIGHUP reload")
    record = compose.api("POST", "/plugins/hello_compose/trigger?wait=60",
                         {"event_id": "hello-1", "topic": "hello.v1", "event_type": "hi"})
    assert record["status"] == "succeeded", record
    assert json.loads(record["stdout"])["payload"] == {"from": "compose"}


def test_a_worker_container_killed_mid_burst_loses_nothing(compose: ComposeStack) -> None:
    workers = compose.docker("ps", "-q", "--filter",
                             f"label=com.docker.compose.project={compose.project}",
                             "--filter", "label=com.docker.compose.service=worker").split()
    assert len(workers) == 3
    ids = compose.burst(12)
    wait_until(lambda: any(r["status"] == "running" for r in compose.records("shell_runner")
                           if r["event_id"] in ids), 60, "runs in flight")
    compose.docker("kill", workers[0])
    runs = compose.finished(ids, timeout=240)
    per_event = {e: [r for r in runs if r["event_id"] == e] for e in ids}
    assert all(len(v) == 1 for v in per_event.values()), per_event  # none doubled
    assert {r["status"] for r in runs} == {"succeeded"}, [
        (r["status"], r["reason"]) for r in runs]
    assert all(len(r["result_event_ids"]) == 1 for r in runs)
