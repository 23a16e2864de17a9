"""Redis across hosts, for tests and the soak: a private CA (manager.core.certs, as `make
up` makes one), Redis nodes and Sentinels that speak TLS only and require client
certificates, a Sentinel cluster of a primary, two replicas and three Sentinels, and an
impostor: a TLS server that records what a client sends it."""

from __future__ import annotations

import functools
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import redis

from harness import free_port, private_settings, session_dir, wait_until
from manager.core import certs
from manager.core.certs import Kind
from manager.core.config import Settings


@functools.cache
def project_ca() -> Path:
    """This process's CA (a run directory's tls/, as `make up` lays it out): server
    certificate `redis` for 127.0.0.1 and localhost, client certificate `client`."""
    where = Path(tempfile.mkdtemp(prefix="run-", dir=session_dir())) / "tls"
    certs.new_ca(where)
    certs.issue(where, Kind.SERVER, "redis", ["127.0.0.1", "localhost"])
    certs.issue(where, Kind.CLIENT, "client")
    return where


def tls_settings(ca: Path | None = None) -> dict[str, str]:
    """Settings keywords of a client presenting the CA's `client` certificate."""
    ca = ca or project_ca()
    return {"redis_tls_ca": str(ca / "trust.crt"),
            "redis_tls_cert": str(ca / "clients/client.crt"),
            "redis_tls_key": str(ca / "clients/client.key")}


def tls_lines(port: int, ca: Path | None = None) -> list[str]:
    """A node's TLS configuration: TLS only, client certificates required, replication and
    Sentinel traffic over TLS too (what scripts/services.sh writes)."""
    ca = ca or project_ca()
    return ["port 0", f"tls-port {port}", f"tls-cert-file {ca}/servers/redis.crt",
            f"tls-key-file {ca}/servers/redis.key", f"tls-ca-cert-file {ca}/trust.crt",
            "tls-auth-clients yes", "tls-replication yes"]


def tls_client(port: int, password: str, **extra: object) -> redis.Redis:
    ca = project_ca()
    return redis.Redis(port=port, password=password, socket_timeout=2, ssl=True,
                       ssl_ca_certs=str(ca / "trust.crt"),
                       ssl_certfile=str(ca / "clients/client.crt"),
                       ssl_keyfile=str(ca / "clients/client.key"), **extra)


class RedisNode:
    """One redis-server (a data node, or a Sentinel) on a free port, TLS only, with its
    own dir."""

    def __init__(self, root: Path, name: str, lines: list[str], password: str,
                 sentinel: bool = False) -> None:
        self.port = free_port()
        self.password = password
        self.dir = root / name
        self.dir.mkdir()
        self.conf = self.dir / "redis.conf"
        self.conf.write_text("\n".join([*tls_lines(self.port), "bind 127.0.0.1",
                                        f"dir {self.dir}", f"requirepass {self.password}",
                                        *lines]) + "\n")
        self.sentinel = sentinel
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", str(self.conf)] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(args, stdout=(self.dir / "log").open("ab"),
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: self.ping(), 20, f"redis on {self.port}")

    def client(self) -> redis.Redis:
        return tls_client(self.port, self.password)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def role(self) -> str:
        return self.client().info("replication")["role"]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM; SIGKILL when it does not exit within 10 s (a replica busy resyncing)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class SentinelCluster:
    """A primary, two replicas and three Sentinels (quorum 2) on free ports, one password,
    TLS between all of them and to every client: what `TITAN_REDIS_HA=1 make up` starts.
    Losing any one data node leaves a primary with a replica to confirm its writes."""

    def __init__(self) -> None:
        self.password = uuid.uuid4().hex
        self.root = Path(tempfile.mkdtemp(prefix="titan-ha-"))
        data = ["appendonly yes", "appendfsync everysec", 'save ""',
                f"masterauth {self.password}"]
        self.primary = RedisNode(self.root, "primary", data, self.password)
        self.replicas = [RedisNode(self.root, f"replica{n}",
                                   [*data, f"replicaof 127.0.0.1 {self.primary.port}"],
                                   self.password) for n in (1, 2)]
        wait_until(lambda: all(r.client().info("replication")["master_link_status"] == "up"
                               for r in self.replicas), 30, "the replicas to sync")
        self.sentinels = [RedisNode(self.root, f"sentinel{n}", [
            f"sentinel monitor titan 127.0.0.1 {self.primary.port} 2",
            f"sentinel auth-pass titan {self.password}",
            # make up's 2 s: at 1 s, on a loaded machine the new primary answered late, was
            # taken for dead and failed over a second time, 31 s after the first
            "sentinel down-after-milliseconds titan 2000",
            "sentinel failover-timeout titan 5000"], self.password, sentinel=True)
            for n in range(3)]
        # A failover needs every Sentinel to know its peers and both replicas (learnt from
        # the primary's INFO, every 10 s): a primary killed before that is never replaced.
        wait_until(lambda: all(int(m["num-other-sentinels"]) == 2 and int(m["num-slaves"]) == 2
                               for m in (s.client().sentinel_master("titan")
                                         for s in self.sentinels)),
                   30, "the Sentinels to meet and to know both replicas")
        self.dead: list[RedisNode] = []

    def settings(self, plugins_dir: Path, run_dir: Path, **extra: object) -> Settings:
        return private_settings(
            f"rediss://default:{self.password}@127.0.0.1:{self.primary.port}/0", plugins_dir,
            run_dir, redis_sentinels=",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
            redis_master="titan", redis_min_replicas=1, **tls_settings(), **extra)

    def fail_over(self) -> None:
        """SIGKILLs the primary; returns once Sentinel promoted a replica. Nobody starts
        the dead node again: `primary` is the new one, `dead` holds the old."""
        old = self.primary
        old.kill()
        wait_until(lambda: any(r.role() == "master" for r in self.replicas), 60,
                   "Sentinel to promote a replica")
        self.primary = next(r for r in self.replicas if r.role() == "master")
        self.replicas = [r for r in self.replicas if r is not self.primary]
        self.dead.append(old)

    def settled(self) -> bool:
        """One live data node is the primary Sentinel names and the other replicates it with
        its link up. Sentinel may fail over again on a loaded machine (a primary busy past
        `down-after-milliseconds`): `primary` and `replicas` then follow its choice."""
        live = [self.primary, *self.replicas]
        try:
            _, port = self.sentinels[0].client().sentinel_get_master_addr_by_name("titan")
            primary = next(n for n in live if n.port == int(port))
            if primary.role() != "master":
                return False
            followers = [n for n in live if n is not primary]
            if not all(n.client().info("replication").get("master_port") == primary.port
                       and n.client().info("replication")["master_link_status"] == "up"
                       for n in followers):
                return False
        except (redis.RedisError, StopIteration):
            return False
        self.primary, self.replicas = primary, followers
        return True

    def switches(self) -> int:
        """How many times the first Sentinel moved the primary (+switch-master)."""
        return (self.sentinels[0].dir / "log").read_text(errors="replace").count("+switch-master")

    def describe(self) -> str:
        """Each live node's replication state and each Sentinel's last log lines: what a
        failed failover test prints to say which step did not happen."""
        lines = [f"+switch-master seen by sentinel0: {self.switches()}"]
        for node in (self.primary, *self.replicas):
            try:
                info = node.client().info("replication")
            except redis.RedisError as exc:
                info = {"error": str(exc)}
            lines.append(f"{node.dir.name}:{node.port} {info}")
        for node in (*self.sentinels, self.primary, *self.replicas):
            tail = (node.dir / "log").read_text(errors="replace").splitlines()[-12:]
            lines += [f"--- {node.dir.name} log", *tail]
        return "\n".join(lines)

    def close(self) -> None:
        try:
            for node in (*self.sentinels, *self.replicas, *self.dead, self.primary):
                node.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class Impostor:
    """A TLS server on a free loopback port with the certificate it was given, recording
    every byte a client sends it once the handshake is done."""

    def __init__(self, cert: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, cert.with_suffix(".key"))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = bytearray()
        self.handshakes = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    self.handshakes += 1
                    while chunk := tls.recv(4096):
                        self.received += chunk
                        tls.sendall(b"+OK\r\n")
            except (ssl.SSLError, OSError):
                raw.close()

    def close(self) -> None:
        self.server.close()
