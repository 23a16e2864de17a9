"""The egress case of `make bench`: a warm run that makes one HTTP request through the
egress proxy (a proxy of the bench's own, its network and directory, and a local server
named in its hosts file), against a warm run without network. What the proxy adds is
the grant written and removed, the request's trip through Squid and its helper, and the
connection log read when the run ends."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from manager.core.config import Settings
from manager.egress import proxy

HOST = "bench.test"
MAIN = """import json, os, urllib.request
with urllib.request.urlopen("http://{host}:{port}/", timeout=10) as resp:
    resp.read()
print('{{"topic": "bench.v1", "event_type": "tock", "payload": {{}}}}')
"""


class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server calls it by this name
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def egress_case(settings: Settings, plugins: Path, client: Any
                ) -> Iterator[tuple[Settings, dict[str, str]]]:
    """The bench's settings with its proxy running and the plugin `noop_net` (event type
    tick_net) in `plugins`; yields them and the environment its workers need."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    uid = uuid.uuid4().hex[:6]
    egress_dir = Path(f"/run/titan/egress/bench-{uid}")
    hosts = egress_dir.parent / f"bench-{uid}.hosts"
    egress_dir.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(f"127.0.0.1 {HOST}\n")
    hosts.chmod(0o644)
    mine = settings.with_(egress_dir=egress_dir, egress_network=f"titanbench-egress-{uid}",
                          egress_bridge=f"ttbe{uid}", egress_allow=(f"{HOST}:{port}",),
                          egress_hosts=str(hosts))
    target = plugins / "noop_net"
    target.mkdir()
    (target / "main.py").write_text(MAIN.format(host=HOST, port=port))
    (target / "plugin.yaml").write_text(yaml.safe_dump({
        "name": "noop_net", "version": "1.0.0", "description": "Benchmark plugin - one "
        "request through the egress proxy.", "triggers": [
            {"topic": "bench.v1", "event_type": "tick_net"}],
        "entrypoint": "python main.py", "image": "titan-runtime:py3.11", "timeout": 30,
        "resources": {"cpu": "1", "memory": "128Mi"},
        "permissions": {"net": {"allow": [f"{HOST}:{port}"]}}}, sort_keys=False))
    env = {"TITAN_EGRESS_DIR": str(egress_dir), "TITAN_EGRESS_NETWORK": mine.egress_network,
           "TITAN_EGRESS_BRIDGE": mine.egress_bridge, "TITAN_EGRESS_HOSTS": str(hosts),
           "TITAN_EGRESS_ALLOW": ",".join(mine.egress_allow)}
    try:
        proxy.start(mine.egress, client)
        yield mine, env
    finally:
        proxy.stop(mine.egress, client)
        shutil.rmtree(egress_dir, ignore_errors=True)
        hosts.unlink(missing_ok=True)
        server.shutdown()
        server.server_close()
