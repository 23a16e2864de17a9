"""The compose deployment, for real: images built here with no registry, a private project
(name, ports, manager container name, directories) so it never meets a user's stack, 3
worker containers, the seed's `docker exec <manager> kill -HUP 1`; tried as an attacker
would: a host account probing the containers' addresses, every service's privileges and
environment, a worker container killed mid-run; and nothing left behind after `down`."""

from __future__ import annotations

import json
import pwd
import shutil
import subprocess
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compose_stack import ComposeStack, Hook
from harness import http_status, wait_until
from manager.core.slots import HELD_FOR_S

pytestmark = pytest.mark.integration
PORTS = (6379, 26379, 8003, 8004, 5555)  # every port a service listens on
# Run as another host account: which (address, port) a service of ours answers at.
# Redis is told by a TLS handshake its certificate (our CA) passes; the API, its metrics
# and Flower by what only they say (Flower's /healthcheck needs no login).
PROBE = r"""
import json, socket, ssl, sys
answered = []
for ip, port in json.loads(sys.argv[1]):
    try:
        with socket.create_connection((ip, port), 3) as raw:
            if port in (6379, 26379):
                ctx = ssl.create_default_context(cadata=sys.argv[2])
                ctx.check_hostname = False
                with ctx.wrap_socket(raw):
                    answered.append([ip, port])
                continue
            path = b"/healthcheck" if port == 5555 else b"/health"
            raw.sendall(b"GET " + path + b" HTTP/1.0\r\nHost: probe\r\n\r\n")
            raw.settimeout(3)
            reply = b""
            while len(reply) < 65536:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except (OSError, ssl.SSLError):
        continue
    body = reply.partition(b"\r\n\r\n")[2]
    if b'"redis"' in body or b"titan_" in body or body.strip() == b"OK":
        answered.append([ip, port])
print(json.dumps(answered))
"""


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
        firewall = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True,
                                  text=True, check=False).stdout
        caches = stack.workers_dir / stack.project
        leftover = caches.exists()
        shutil.rmtree(stack.workers_dir, ignore_errors=True)
        assert not (left.strip() or networks.strip() or volumes.strip()), (left, networks,
                                                                          volumes)
        assert not leftover, f"compose-down left the workers' caches in {caches}"
        assert f"titan-compose:{stack.project}" not in firewall, firewall


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


def addresses(compose: ComposeStack) -> list[tuple[str, int]]:
    """Every (address, port) of every service container of the project."""
    found = []
    for info in compose.containers():
        for network in info["NetworkSettings"]["Networks"].values():
            if network.get("IPAddress"):
                found += [(network["IPAddress"], port) for port in PORTS]
    return found


def probe(compose: ComposeStack, targets: list[tuple[str, int]], uid: int | None) -> list[list]:
    """What answers the probe, run as root (uid None) or as the host account `uid`."""
    ca = (Path(compose.env["TITAN_COMPOSE_RUN_DIR"]) / "tls" / "trust.crt").read_text()
    drop = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                   "--clear-groups", "--"]
    proc = subprocess.run([*drop, "/usr/bin/python3", "-I", "-c", PROBE, json.dumps(targets),
                           ca], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)


def test_no_service_answers_a_host_account_at_its_container_address(
        compose: ComposeStack) -> None:
    """The project's bridge answers root only (its docker-proxy delivers the ports
    published on 127.0.0.1); the same probe as root finds every service there."""
    targets = addresses(compose)
    ip = {service: info["NetworkSettings"]["Networks"][f"{compose.project}_default"]
          ["IPAddress"] for service in ("redis", "manager", "flower")
          for info in compose.containers(service)}
    stranger = 1_700_000 + uuid.uuid4().int % 100_000
    assert probe(compose, targets, stranger) == []
    assert sorted(map(tuple, probe(compose, targets, None))) == sorted([
        (ip["redis"], 6379), (ip["manager"], 8003), (ip["manager"], 8004),
        (ip["flower"], 5555)])
    assert http_status(f"http://127.0.0.1:{compose.port}/health") == 200  # published


def test_every_service_runs_with_least_privilege_and_no_secret_in_its_environment(
        compose: ComposeStack) -> None:
    secrets = [compose.secret(name) for name in
               ("TITAN_REDIS_PASSWORD", "TITAN_API_TOKEN", "TITAN_FLOWER_AUTH")]
    secrets.append(secrets[-1].split(":", 1)[1])
    services = {info["Config"]["Labels"]["com.docker.compose.service"]: info
                for info in compose.containers()}
    assert set(services) == {"redis", "manager", "worker", "flower", "proxy"}, set(services)
    for service, info in services.items():
        host, config = info["HostConfig"], info["Config"]
        shown = json.dumps([config["Env"], config["Cmd"], config["Entrypoint"], info["Args"]])
        assert not [s for s in secrets if s in shown], f"{service} shows a secret"
        assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"], service
        assert "no-new-privileges:true" in host["SecurityOpt"], service
        assert host["Memory"] > 0 and host["PidsLimit"] > 0, service
        assert host["RestartPolicy"]["Name"] == "unless-stopped", service
        if service == "proxy":  # Squid: root to start, then its own uid (no host account)
            assert set(host["CapAdd"]) == {"SETUID", "SETGID"}, host["CapAdd"]
            proxy_uid = compose.secret("TITAN_PROXY_UID")
            rows = [line.split(None, 7) for line in
                    compose.docker("top", info["Id"]).splitlines()[1:]]  # UID ... CMD
            assert all(r[7].startswith("squid -N") for r in rows if r[0] in ("root", "0")), rows
            assert any(r[0] == proxy_uid and "helper.py" in r[7] for r in rows), rows
            proxy_uid = int(proxy_uid)
            with pytest.raises(KeyError):
                pwd.getpwuid(proxy_uid)
        elif service in ("redis", "flower"):  # a uid of its own that no host account has
            uid = int(config["User"].split(":")[0])
            assert uid >= 1_900_000 and not host.get("CapAdd"), (service, config["User"])
            with pytest.raises(KeyError):
                pwd.getpwuid(uid)
        else:  # root for pip's uid switch (and the workers' Docker socket): six capabilities
            assert config["User"] in ("", "0", "root"), service
            assert set(host["CapAdd"]) == {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID",
                                           "SETGID", "KILL"}, (service, host["CapAdd"])
        mounted = [m["Destination"] for m in info["Mounts"]
                   if m["Destination"].startswith("/run/secrets/")]
        files = compose.docker("exec", info["Id"], "stat", "-c", "%a %u %n", "-L",
                               *mounted) if mounted else ""
        owner = config["User"].split(":")[0] or "0"
        for line in files.splitlines():
            mode, uid_, _ = line.split()
            assert (mode, uid_) == ("400", owner), (service, line)
    assert "titan_api_token" not in json.dumps(services["worker"]["Mounts"])  # only its own


def test_a_plugin_posts_through_the_proxy_with_its_secret(compose: ComposeStack) -> None:
    value = f"tok-{uuid.uuid4().hex}"
    compose.api("PUT", "/secrets/post_token", {"value": value, "plugins": ["poster"]})
    record = compose.api("POST", "/plugins/poster/trigger?wait=90", {
        "event_id": f"post-{uuid.uuid4().hex[:8]}", "topic": "post.v1", "event_type": "post"})
    assert record["status"] == "succeeded", (record["reason"], record["stderr"])
    assert [(c["host"], c["decision"], c["status"]) for c in record["egress"]] == [
        ("api.test", "allowed", 200)]
    assert Hook.seen[-1]["x-token"] == value  # the server got it; nothing else shows it
    assert value not in json.dumps(record) and '"token": "[secret]"' in record["stdout"]


def test_a_worker_container_killed_mid_run_loses_nothing_and_leaves_nothing(
        compose: ComposeStack) -> None:
    """`docker kill -s KILL` of the worker container running a run: the run is re-queued
    by the sweeper one lease after its hold lapsed (kombu's visibility timeout here is its
    default, 15 min: waiting for it would time the test out), every event succeeds once,
    and the dead worker's plugin containers are removed by the workers still alive."""
    ids = compose.burst(9, "sleeper")
    running = wait_until(lambda: [r for r in compose.records("sleeper")
                                  if r["event_id"] in ids and r["status"] == "running"],
                         120, "a run in flight")[0]
    victim = next(info for info in compose.containers("worker")
                  if running["worker"] == f"worker@{info['Config']['Hostname']}")
    label = f"label=titan.worker_container={victim['Id']}"
    assert compose.docker("ps", "-aq", "--filter", label).split(), "its plugin container"
    compose.docker("kill", "-s", "KILL", victim["Id"])
    runs = compose.finished(ids, timeout=HELD_FOR_S + 10 + 3 * 10 + 60, plugin="sleeper")
    per_event = {e: [r for r in runs if r["event_id"] == e] for e in ids}
    assert all(len(v) == 1 for v in per_event.values()), per_event  # none doubled
    assert {r["status"] for r in runs} == {"succeeded"}, [
        (r["status"], r["reason"]) for r in runs]
    assert all(len(r["result_event_ids"]) == 1 for r in runs)
    again = next(r for r in runs if r["invocation_id"] == running["invocation_id"])
    assert again["requeues"] == 1 and again["worker"] != running["worker"], again
    wait_until(lambda: not compose.docker("ps", "-aq", "--filter", label).split(), 60,
               "the dead worker's plugin containers to be reaped")
