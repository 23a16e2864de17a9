"""Egress and secrets (SPEC §4) with real parts, on all four lanes: the real proxy
(Squid, manager/egress) on an internal network of the test's own, a local HTTP and HTTPS
server named by TITAN_EGRESS_HOSTS, real workers and containers. A plugin reaches exactly
what its grant names, through the proxy; everything else is refused with the reason, and
every request is in the run's record. Secrets reach a bound plugin as files, and nowhere
else."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hoststate import own_interface, own_name

from harness import Bus, WorkerProcess, new_id, record_of, wait_until, wired
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.core.secrets import SecretStore
from manager.egress import proxy
from manager.plugins.registry import Registry

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent
SECRET = "hunter2-" + uuid.uuid4().hex  # a value that appears nowhere by chance
LANES = ["warm", "cold", "gvisor-warm", "gvisor-cold"]


class Handler(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # http.server calls it by this name
        Handler.seen.append({"path": self.path,
                             **{k.lower(): v for k, v in self.headers.items()}})
        body = f"hello from {self.server.server_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A plain and a TLS server on 127.0.0.1 (the host's loopback: only a host the
    ceiling names exactly may resolve there)."""
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    cert, key = self_signed("api.test")
    where = tmp_path_factory.mktemp("tls")
    (where / "c.pem").write_bytes(cert)
    (where / "k.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(where / "c.pem", where / "k.pem")
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (plain, tls)]
    for t in threads:
        t.start()
    yield {"http": plain.server_address[1], "https": tls.server_address[1],
           "cadata": cert.decode()}
    for s in (plain, tls):
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def egress(servers: dict[str, Any], settings: Settings, docker_client: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The session's settings with a proxy of this module's own: its network, bridge,
    directory and ceiling (api.test exactly, and any host of wild.test)."""
    uid = uuid.uuid4().hex[:6]
    hosts = tmp_path_factory.mktemp("egress") / "hosts"
    hosts.write_text("127.0.0.1 api.test\n127.0.0.1 x.wild.test\n")
    hosts.chmod(0o644)
    hosts.parent.chmod(0o755)
    mine = settings.with_(
        egress_dir=Path(f"/run/titan/egress-test-{uid}"),
        egress_network=own_name("egress"), egress_bridge=own_interface(),
        egress_allow=(f"api.test:{servers['http']}", f"api.test:{servers['https']}",
                      "*.wild.test:*"),
        egress_hosts=str(hosts), secret_files_dir=Path(f"/run/titan/secrets-test-{uid}"))
    _opened_up(hosts)
    try:
        proxy.start(mine.egress, docker_client)
        yield mine
    finally:
        proxy.stop(mine.egress, docker_client)
        left = proxy.processes(mine.egress)
        shutil.rmtree(mine.egress_dir, ignore_errors=True)
        _unmount(mine.secret_files_dir)
        assert not left, f"the proxy's processes outlived its stop: {left}"


def _opened_up(path: Path) -> None:
    """The proxy's uid reads the hosts file: every directory on its way is passable."""
    for parent in path.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o111)


def _unmount(path: Path) -> None:
    import subprocess

    while subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
        pass
    shutil.rmtree(path, ignore_errors=True)
    (path.parent / f".{path.name}.lock").unlink(missing_ok=True)


def probe_plugin(directory: Path, servers: dict[str, Any]) -> None:
    """egress_probe, asking for the plain and TLS ports of api.test, any wild.test host
    and the metadata address's name; and egress_unbound, asking for a secret it is not
    bound to."""
    for name, secrets in (("egress_probe", ["probe_token"]), ("egress_unbound", ["probe_token"])):
        target = directory / name
        shutil.copytree(HERE / "egress" / "egress_probe", target)
        (target / "plugin.yaml").write_text(yaml.safe_dump({
            "name": name, "version": "0.1.0", "triggers": [
                {"topic": "egress.v1", "event_type": name}],
            "entrypoint": "python main.py", "image": "titan-runtime:py3.11", "timeout": 20,
            "permissions": {"net": {"allow": [f"api.test:{servers['http']}",
                                              f"api.test:{servers['https']}",
                                              "*.wild.test:*"]}},
            "secrets": secrets}))


@pytest.fixture(scope="module", params=LANES)
def lane(request: pytest.FixtureRequest, conn: redis.Redis, egress: Settings,
         servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[str, Settings, Bus]]:
    name = request.param
    plugins = tmp_path_factory.mktemp(f"egress-plugins-{name}")
    probe_plugin(plugins, servers)
    uid = uuid.uuid4().hex[:6]
    mine = egress.with_(plugins_dir=plugins, key_prefix=f"{egress.key_prefix}e{uid}",
                        event_stream=f"{egress.event_stream}.e{uid}",
                        task_queue=f"{egress.task_queue}.e{uid}",
                        prewarm_size=0 if name.endswith("cold") else 1,
                        isolation="gvisor" if name.startswith("gvisor") else "container")
    Registry(wired(conn, mine)).reload()
    SecretStore(conn, mine.keys, mine.secrets_key).set("probe_token", SECRET.encode(),
                                                       ("egress_probe",))
    env = {"TITAN_EGRESS_DIR": str(mine.egress_dir), "TITAN_EGRESS_NETWORK": mine.egress_network,
           "TITAN_EGRESS_BRIDGE": mine.egress_bridge, "TITAN_EGRESS_HOSTS": mine.egress_hosts,
           "TITAN_EGRESS_ALLOW": ",".join(mine.egress_allow), "TITAN_ISOLATION": mine.isolation,
           "TITAN_SECRETS_KEY": str(mine.secrets_key),
           "TITAN_SECRET_FILES_DIR": str(mine.secret_files_dir)}
    worker = WorkerProcess(mine, f"egress-{name}-{uid}", concurrency=2, **env)
    listener_conn = redis.Redis.from_url(mine.redis_url)
    listener = Listener(wired(listener_conn, mine), Registry(wired(listener_conn, mine)),
                        Dispatcher(wired(conn, mine), make_celery(mine.broker)))
    thread = threading.Thread(target=listener.run, daemon=True)
    try:
        worker.wait_ready(conn)
        thread.start()
        yield name, mine, Bus(conn, mine)
    finally:
        listener.stop()
        worker.stop()


def probe(conn: redis.Redis, lane: tuple[str, Settings, Bus], steps: list[dict[str, Any]],
          plugin: str = "egress_probe") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run of `plugin` through the bus: its record, and what each step found."""
    name, settings, bus = lane
    event_id = new_id("egress")
    bus.publish({"event_id": event_id, "topic": "egress.v1", "event_type": plugin,
                 "payload": {"steps": steps}})
    caused = bus.result_of(event_id, timeout=90)
    record = wait_until(lambda: next((r for r in _records(conn, settings, plugin)
                                      if r["event_id"] == event_id), None), 30, "the record")
    if name.endswith("cold"):
        assert record["warm"] is False
    return record, caused["payload"].get("results", [])


def _records(conn: redis.Redis, settings: Settings, plugin: str) -> list[dict[str, Any]]:
    ids = conn.zrevrange(settings.keys.plugin_invocations(plugin), 0, 20)
    return [record_of(conn, settings, i.decode()) for i in ids]


def test_a_run_reaches_exactly_its_grant(conn, lane, servers, host_port, docker_client) -> None:
    _, settings, _ = lane
    gateway = proxy.where(docker_client, settings.egress).gateway
    http_, https_ = servers["http"], servers["https"]
    Handler.seen.clear()
    steps = [
        {"do": "get", "url": f"http://api.test:{http_}/hello"},
        {"do": "get", "url": f"https://api.test:{https_}/tls", "cadata": servers["cadata"]},
        {"do": "get", "url": f"http://other.test:{http_}/"},  # not in the grant
        {"do": "get", "url": f"http://127.0.0.1:{http_}/"},  # a direct IP
        {"do": "get", "url": "http://169.254.169.254/latest/meta-data/"},  # the metadata
        {"do": "get", "url": f"http://x.wild.test:{http_}/"},  # a wildcard to loopback
        {"do": "connect", "host": "127.0.0.1", "port": http_},  # around the proxy
        {"do": "connect", "host": gateway, "port": host_port},  # the host, another port
        {"do": "resolve", "name": "api.test"},  # no DNS in the container
        {"do": "resolve", "name": "localhost.localdomain.pypi.org"},
    ]
    record, found = probe(conn, lane, steps)
    assert record["status"] == "succeeded", (record["reason"], record["stderr"],
                                             record["egress"])
    ok, tls, other, direct, meta, wild, around, host, dns1, dns2 = found
    assert ok == {"status": 200, "body": f"hello from {http_}"}
    assert tls == {"status": 200, "body": f"hello from {https_}"}
    for refused in (other, direct, meta):
        assert refused["status"] == 403 and "is not in permissions.net.allow" in refused["body"]
    assert wild["status"] == 403 and "resolves to an internal address" in wild["body"]
    assert around["connected"] is False and host["connected"] is False
    assert "addresses" not in dns1 and "addresses" not in dns2
    # the server saw the plugin's request and no credential of the proxy's
    assert [s["path"] for s in Handler.seen] == ["/hello", "/tls"]
    assert not any("proxy-authorization" in s for s in Handler.seen)
    seen = {(c["method"], c["host"], str(c["port"])): c for c in record["egress"]}
    assert seen[("GET", "api.test", str(http_))]["decision"] == "allowed"
    assert seen[("GET", "api.test", str(http_))]["bytes_received"] > 0
    assert seen[("CONNECT", "api.test", str(https_))]["decision"] == "allowed"
    assert seen[("CONNECT", "api.test", str(https_))]["bytes_received"] > 1000  # TLS
    assert "not in permissions.net.allow" in seen[("GET", "other.test", str(http_))]["why"]
    assert seen[("GET", "169.254.169.254", "80")]["decision"] == "refused"
    assert "internal address" in seen[("GET", "x.wild.test", str(http_))]["why"]
    assert len(record["egress"]) == 6


def test_credentials_live_only_with_their_run(conn, lane, servers) -> None:
    url = f"http://api.test:{servers['http']}/again"
    first, found = probe(conn, lane, [{"do": "proxy_env"}])
    credentials = found[0]["value"]
    assert credentials.startswith("http://r") and first["status"] == "succeeded"
    second, found = probe(conn, lane, [{"do": "get", "url": url, "proxy": credentials},
                                       {"do": "get", "url": url}])
    stolen, own = found
    assert stolen["status"] == 403 and "belong to no live run" in stolen["body"]
    assert own["status"] == 200
    assert [c["decision"] for c in second["egress"]] == ["allowed"]  # its own only


def test_a_secret_reaches_only_a_bound_run_as_a_file(conn, lane, docker_client) -> None:
    _, settings, _ = lane
    seen_inspect: list[str] = []

    def inspect_while_it_runs() -> None:  # every container of the lane, as root sees it
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not seen_inspect:
            found = docker_client.containers.list(
                filters={"label": f"titan.instance={settings.instance}"})
            seen_inspect.extend(json.dumps(c.attrs) for c in found)
            time.sleep(0.2)

    looker = threading.Thread(target=inspect_while_it_runs)
    looker.start()
    record, found = probe(conn, lane, [{"do": "secret", "name": "probe_token", "say": True},
                                       {"do": "sleep", "s": 1}])
    looker.join()
    assert record["status"] == "succeeded", record
    seen = found[0]
    assert seen["sha256"] == hashlib.sha256(SECRET.encode()).hexdigest()
    assert seen["mode"] == "0o400" and seen["mine"] is True and seen["in_env"] is False
    assert seen["echo"] == "[secret]"  # masked in what the run wrote, results included
    assert SECRET not in json.dumps(record) and "the value is [secret]" in record["stderr"]
    for key in conn.scan_iter(f"{settings.key_prefix}*"):
        assert SECRET.encode() not in _contents(conn, key), key
    assert seen_inspect and not [c for c in seen_inspect if SECRET in c]  # docker inspect
    logs = "".join(p.read_text(errors="replace") for p in settings.run_dir.glob("*.log"))
    assert SECRET not in logs  # the workers' logs (what Flower is told comes from there)
    unbound, _ = probe_failed(conn, lane, "egress_unbound")
    assert unbound["status"] == "failed"
    assert ("secret 'probe_token' is not bound to plugin 'egress_unbound': titan-plugins.py "
            "secret set probe_token --plugin egress_unbound") in unbound["reason"]


def _contents(conn: redis.Redis, key: bytes) -> bytes:
    """Everything a key holds, as Redis gives it to a client (what the AOF writes)."""
    kind = conn.type(key).decode()
    parts: Any = {"string": lambda: [conn.get(key)],
                  "hash": lambda: [*conn.hgetall(key).items()],
                  "list": lambda: conn.lrange(key, 0, -1),
                  "set": lambda: conn.smembers(key),
                  "zset": lambda: conn.zrange(key, 0, -1),
                  "stream": lambda: [e[1] for e in conn.xrange(key)]}.get(kind, list)()
    return repr(parts).encode()


def probe_failed(conn: redis.Redis, lane: tuple[str, Settings, Bus],
                 plugin: str) -> tuple[dict[str, Any], dict[str, Any]]:
    _name, settings, bus = lane
    event_id = new_id("egress")
    bus.publish({"event_id": event_id, "topic": "egress.v1", "event_type": plugin,
                 "payload": {"steps": [{"do": "secret", "name": "probe_token"}]}})
    failure = bus.result_of(event_id, timeout=90)
    record = wait_until(lambda: next((r for r in _records(conn, settings, plugin)
                                      if r["event_id"] == event_id), None), 30, "the record")
    return record, failure


@pytest.mark.parametrize("lane", ["warm"], indirect=True)
def test_a_proxy_stopped_mid_run_fails_the_run_visibly_and_comes_back(
        conn, lane, egress, servers, docker_client) -> None:
    _, settings, bus = lane
    url = f"http://api.test:{servers['http']}/late"
    event_id = new_id("egress")
    started = f"/started-{event_id}"  # the run is executing, its grant issued: the proxy
    # stops during its sleep (stopped before the grant, the run waits for it instead)
    bus.publish({"event_id": event_id, "topic": "egress.v1", "event_type": "egress_probe",
                 "payload": {"steps": [
                     {"do": "must_get", "url": f"http://api.test:{servers['http']}{started}"},
                     {"do": "sleep", "s": 6}, {"do": "must_get", "url": url}]}})
    wait_until(lambda: any(seen["path"] == started for seen in Handler.seen), 60,
               "the run to reach the server through the proxy")
    proxy.stop(egress.egress)  # Squid only: its network and firewall rules stay
    assert not proxy.processes(egress.egress) and not proxy.running(egress.egress)
    try:
        failure = bus.result_of(event_id, timeout=90)
        record = next(r for r in _records(conn, settings, "egress_probe")
                      if r["event_id"] == event_id)
        assert failure["event_type"] == "invocation_failed"
        assert record["status"] == "failed"
        assert "could not post" in record["stderr"]
        assert "the egress proxy stopped answering during the run" in record["reason"]
    finally:
        proxy.start(egress.egress, docker_client)  # what make up does
    record, found = probe(conn, lane, [{"do": "must_get", "url": url}])
    assert record["status"] == "succeeded" and found[0]["status"] == 200
