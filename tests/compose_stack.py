"""A compose project of a test's own (tests/test_compose.py): built here with no registry,
with its own name, ports, directories, env file and service image, and what a test asks
of it (the API, records, the engine's view of its containers)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path

from hoststate import own_id

from harness import free_port, wait_until
from manager.core.config import ROOT

ACTIVE = ("pending", "queued", "throttled", "running", "retrying")
SLEEPER = {  # a run long enough to be killed in the middle of
    "plugin.yaml": "name: sleeper\nversion: 1.0.0\ntriggers: [{topic: nap.v1, event_type: nap}]\n"
                   "entrypoint: python main.py\nimage: titan-runtime:py3.11\ntimeout: 60\n",
    "main.py": "import json, time\ntime.sleep(4)\nprint(json.dumps({'topic': 'nap.v1', "
               "'event_type': 'napped', 'payload': {}}))\n",
}


POSTER = {  # a plugin that posts to a local server through the proxy, with a secret
    "plugin.yaml": "name: poster\nversion: 1.0.0\n"
                   "triggers: [{{topic: post.v1, event_type: post}}]\n"
                   "entrypoint: python main.py\nimage: titan-runtime:py3.11\ntimeout: 30\n"
                   "permissions: {{net: {{allow: ['api.test:{port}']}}}}\n"
                   "secrets: [post_token]\n",
    "main.py": "import json, urllib.request\ntoken = open('/run/secrets/post_token').read()\n"
               "req = urllib.request.Request('http://api.test:{port}/hook', data=b'{{}}', "
               "headers={{'X-Token': token}})\n"
               "with urllib.request.urlopen(req, timeout=10) as resp:\n"
               "    print(json.dumps({{'topic': 'post.v1', 'event_type': 'posted', "
               "'payload': {{'status': resp.status, 'token': token}}}}))\n",
}


class Hook(http.server.BaseHTTPRequestHandler):
    """The local server the poster reaches (named api.test in the proxy's hosts file)."""

    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:  # http.server calls it by this name
        Hook.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def has_tools(image: str) -> bool:
    """Whether a base image has what compose.sh needs of it (pip, Squid)."""
    return subprocess.run(["docker", "run", "--rm", "--network", "none", image, "sh", "-c",
                           "python3 -m pip --version && command -v squid"],
                          capture_output=True, check=False).returncode == 0


class ComposeStack:
    """A compose project of the test's own: name, ports, directories, env file, and its
    own service image (removed afterwards; a user's `titan-plugin-manager:local` is never
    rebuilt). A base image the host already has is used as it is; else one is built under
    the test's own name and removed afterwards."""

    def __init__(self, tmp: Path) -> None:
        uid = own_id()
        self.project = f"titantest-{uid}"
        self.manager = f"{self.project}-manager"
        self.plugins = tmp / "plugins"
        shutil.copytree(ROOT / "plugins" / "shell_runner", self.plugins / "shell_runner")
        (self.plugins / "sleeper").mkdir()
        for name, text in SLEEPER.items():
            (self.plugins / "sleeper" / name).write_text(text)
        self.hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=self.hook.serve_forever, daemon=True).start()
        hook_port = self.hook.server_address[1]
        (self.plugins / "poster").mkdir()
        for name, text in POSTER.items():
            (self.plugins / "poster" / name).write_text(text.format(port=hook_port))
        hosts = tmp / "egress-hosts"
        hosts.write_text("127.0.0.1 api.test\n")
        hosts.chmod(0o644)
        for parent in hosts.parents:  # the proxy's uid reads it where it lies
            if parent != Path("/"):
                parent.chmod(parent.stat().st_mode | 0o011)
        self.workers_dir = Path(f"/var/lib/titan/test-{uid}")
        self.port = free_port()
        self.env_file = tmp / "compose.env"
        self.service_image = f"titan-plugin-manager:test-{uid}"
        self.base_image = ("titan-base:bookworm" if has_tools("titan-base:bookworm")
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
                    "TITAN_EGRESS_ALLOW": f"api.test:{hook_port}",
                    "TITAN_EGRESS_HOSTS": str(hosts)}

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

    def burst(self, n: int, plugin: str = "shell_runner") -> list[str]:
        ids = [f"compose-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        for event_id in ids:
            event = ({"topic": "nap.v1", "event_type": "nap"} if plugin == "sleeper" else
                     {"topic": "system.v1", "event_type": "run_cmd",
                      "payload": {"command": "echo spread"}})
            self.api("POST", "/events", {"event_id": event_id, **event})
        return ids

    def containers(self, service: str | None = None) -> list[dict]:
        """`docker inspect` of the project's running containers (of one service)."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = self.docker("ps", "-q", "--no-trunc", *filters).split()
        return json.loads(self.docker("inspect", *ids)) if ids else []

    def finished(self, ids: list[str], timeout: float = 180,
                 plugin: str = "shell_runner") -> list[dict]:
        def done() -> list[dict] | None:
            mine = [r for r in self.records(plugin) if r["event_id"] in ids]
            ok = len({r["event_id"] for r in mine}) == len(ids) and all(
                r["status"] not in ACTIVE for r in mine)
            return mine if ok else None

        return wait_until(done, timeout, f"{len(ids)} shell_runner runs to finish")


