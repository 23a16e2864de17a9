"""A private Titan stack for tests and benchmarks: redis-server on a free port, real
Celery worker processes on a private queue, and a reader of the private stream."""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import fcntl
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import redis
from hoststate import own_interface, session_instance

from manager.core.config import ROOT, Settings
from manager.core.contract import queued_tasks
from manager.core.wiring import Wiring
from workers.options import EVENT_PATH
from workers.warm import INBOX, ZYGOTE_PATH

WORKER_START_S = 60
SESSION_DIR = "TITANTEST_DIR"  # set by tests/conftest.py: removed when the session ends


def mkdirs_private(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def session_dir() -> Path:
    """A private (0700) directory of this test session's, on a disk-backed filesystem
    (/var/tmp: plugin deps may hold shared libraries, which a noexec /tmp would refuse),
    removed with everything in it when the session ends."""
    path = os.environ.get(SESSION_DIR)
    if not path:  # the bench and the soak, without the test session: gone at their exit
        path = tempfile.mkdtemp(prefix="titan-run-", dir="/var/tmp")
        os.environ[SESSION_DIR] = path
        atexit.register(shutil.rmtree, path, True)
    return Path(path)


def bridge_gateway(client: Any) -> str:
    """The default bridge's gateway address. A freshly started engine does not record it
    in IPAM.Config (only the subnet), so it is read from the bridge interface itself."""
    attrs = client.networks.get("bridge").attrs
    for config in attrs.get("IPAM", {}).get("Config") or []:
        if config.get("Gateway"):
            return config["Gateway"]
    name = attrs.get("Options", {}).get("com.docker.network.bridge.name", "docker0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = struct.pack("256s", name.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, packed)[20:24])  # SIOCGIFADDR


_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: str, b: str) -> None:
    """Swaps two names atomically: renameat2(RENAME_EXCHANGE)."""
    if _libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:  # AT_FDCWD, EXCHANGE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def broker_drained(conn: redis.Redis, settings: Settings) -> bool:
    """No task message is left: none queued, none delivered and unacknowledged (a late
    duplicate could only come from one of those)."""
    return not queued_tasks(conn, settings.broker) and not conn.hlen(settings.keys.unacked)


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class RedisServer:
    """A throwaway redis-server with a password of its own and its data in a private
    (0700) directory: on a unix socket there (what `make up` starts), or, for tests that
    put a proxy in front of it, on a free loopback port."""

    def __init__(self, persist: bool = False, tcp: bool = False,
                 conf: tuple[str, ...] = ()) -> None:
        self.port = free_port() if tcp else 0
        self.persist = persist
        self.conf_lines = conf  # more configuration (tests/redis_nodes.py: a TLS port)
        self.tls_url = ""  # that port's rediss:// URL, when the caller opened one
        self.password = uuid.uuid4().hex
        self.workdir = tempfile.mkdtemp(prefix="titan-redis-")
        self.socket = f"{self.workdir}/redis.sock"
        self.url = (f"redis://default:{self.password}@127.0.0.1:{self.port}/0" if tcp else
                    f"unix://default:{self.password}@{self.socket}?db=0")
        self.start()

    def start(self) -> None:
        conf = Path(self.workdir) / "redis.conf"  # the password on no command line
        conf.write_text("\n".join([f"requirepass {self.password}", f"unixsocket {self.socket}",
                                   "unixsocketperm 700", *self.conf_lines]) + "\n")
        conf.chmod(0o600)
        self.proc = subprocess.Popen(
            ["redis-server", str(conf), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes" if self.persist else "no",
             "--appendfsync", "everysec", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        conn = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(conn.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 20, "redis-server")

    def stop(self, keep_data: bool = False) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if not keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def crash(self) -> None:
        """SIGKILL: what a process crash or an OOM kill does to Redis."""
        self.proc.kill()
        self.proc.wait(10)


class SocketProxy:
    """A socket that forwards to a server and can be cut and restored: to a process
    pointed at it, the server goes down and comes back."""

    family = socket.AF_UNIX

    def __init__(self, listen_at: Any, target: Any) -> None:
        self.listen_at = listen_at
        self.target = target
        self.server: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()  # a cut and a connection being set up never overlap

    def start(self) -> None:
        if self.family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen_at)
        server = socket.socket(self.family)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self.listen_at)
        server.listen(64)
        with self.lock:
            self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.socket(self.family)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.server is not server:  # cut while this one was being set up
                    client.close()
                    upstream.close()
                    return
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """The server 'goes down': no new connections, and open ones are cut (one being
        set up at this moment too)."""
        with self.lock:
            server, self.server = self.server, None
            conns, self.conns = self.conns, []
        if server is not None:
            server.close()
        if self.family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen_at)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()


class DockerProxy(SocketProxy):
    """Stands in for the Docker engine's socket (a worker's DOCKER_HOST)."""

    def __init__(self, target: str = "/var/run/docker.sock") -> None:
        path = os.path.join(tempfile.mkdtemp(prefix="dproxy-", dir=session_dir()), "docker.sock")
        super().__init__(path, target)
        self.path = path
        self.url = f"unix://{path}"


class RedisProxy(SocketProxy):
    """Stands in for a Redis server on loopback (a process's TITAN_REDIS_URL)."""

    family = socket.AF_INET

    def __init__(self, server: RedisServer) -> None:
        super().__init__(("127.0.0.1", free_port()), ("127.0.0.1", server.port))
        self.url = f"redis://default:{server.password}@127.0.0.1:{self.listen_at[1]}/0"


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"


def run_cli(api_url: str, *args: str, stdin: str | None = None, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess:
    """titan-plugins.py as an operator runs it: with the system's python3 (which lacks the
    project's packages; the script finds the virtualenv itself)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TITAN_")}
    full.update(TITAN_API_URL=api_url, **env)
    return subprocess.run([SYSTEM_PYTHON, str(ROOT / "titan-plugins.py"), *args], env=full,
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False)


def records_of(conn: redis.Redis, settings: Settings, plugin: str,
               limit: int = 200) -> list[dict[str, Any]]:
    """A plugin's recent records, as the API shows them."""
    return [r.public() for r in wired(conn, settings).records.for_plugin(plugin, limit)]


def caused_by(conn: redis.Redis, settings: Settings, event_id: str) -> list[dict[str, Any]]:
    """Every event on the stream caused by `event_id` (results and failure events)."""
    out = []
    for _, fields in conn.xrange(settings.event_stream):
        try:
            event = json.loads(fields[b"event"])
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict) and event.get("causation_id") == event_id:
            out.append(event)
    return out


def record_of(conn: redis.Redis, settings: Settings, invocation_id: str) -> dict[str, Any]:
    record = wired(conn, settings).records.get(invocation_id)
    return record.public() if record else {}


def private_settings(redis_url: str, plugins_dir: Path, run_dir: Path, **extra: Any) -> Settings:
    """Settings whose keys, stream, queue and container labels belong to this run only."""
    uid = uuid.uuid4().hex[:8]
    prefix = f"titantest{uid}"
    return Settings.from_env(
        redis_url=redis_url, key_prefix=prefix, event_stream=f"{prefix}:events",
        dead_stream=f"{prefix}:events:dead", task_queue=f"{prefix}.plugins",
        instance=session_instance(uid), plugins_dir=plugins_dir, run_dir=run_dir,
        cache_dir=Path(tempfile.mkdtemp(prefix="cache-", dir=session_dir())),
        worker_name=f"testhost-{uid}", api_token="", **extra)


def wired(conn: redis.Redis, settings: Settings) -> Wiring:
    """A process's wiring (manager.core.wiring) over the test's connection."""
    return Wiring.connect(settings, conn)


def isolated(settings: Settings, conn: redis.Redis, **changes: Any) -> tuple[Settings, Any]:
    """The session's Redis with keys, stream and queue of this test's own (a sweeper or a
    runner must see only this test's runs), and its registry, loaded."""
    from manager.plugins.registry import Registry

    uid = uuid.uuid4().hex[:6]
    mine = settings.with_(key_prefix=f"{settings.key_prefix}x{uid}",
                          event_stream=f"{settings.event_stream}.{uid}",
                          task_queue=f"{settings.task_queue}.{uid}", **changes)
    registry = Registry(wired(conn, mine))
    registry.reload()
    return mine, registry


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a process needs to share this test's private names and limits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TITAN_", "PROMETHEUS"))}
    env.update({
        "TITAN_REDIS_URL": settings.redis_url, "TITAN_KEY_PREFIX": settings.key_prefix,
        "TITAN_EVENT_STREAM": settings.event_stream, "TITAN_DEAD_STREAM": settings.dead_stream,
        "TITAN_TASK_QUEUE": settings.task_queue, "TITAN_INSTANCE": settings.instance,
        "TITAN_PLUGINS_DIR": str(settings.plugins_dir), "TITAN_RUN_DIR": str(settings.run_dir),
        "TITAN_CACHE_DIR": str(settings.cache_dir), "TITAN_WORKER_NAME": settings.worker_name,
        "TITAN_ALLOWED_ROOTS": ":".join(str(r) for r in settings.allowed_roots),
        "TITAN_PIP_INDEX_URL": settings.pip_index_url,
        "TITAN_REDIS_SENTINELS": settings.redis_sentinels,
        "TITAN_REDIS_MASTER": settings.redis_master,
        "TITAN_REDIS_TLS_CA": settings.redis_tls_ca,
        "TITAN_REDIS_TLS_CERT": settings.redis_tls_cert,
        "TITAN_REDIS_TLS_KEY": settings.redis_tls_key, "TITAN_RUN_IDS": settings.run_ids,
        # what a process SIGKILLed by a test cannot clean up goes with the session
        "TMPDIR": str(mkdirs_private(session_dir() / "tmp")),
    })
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            env[f"TITAN_{name.upper()}"] = str(value)
    env.update(extra)
    return env


class WorkerProcess:
    """A real `celery worker` process on the test's private queue."""

    def __init__(self, settings: Settings, name: str, concurrency: int = 2,
                 cwd: Path = ROOT, **extra_env: str) -> None:
        self.settings = settings
        self.name = name
        self.log = settings.run_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
               "-Q", settings.task_queue, "-n", f"{name}@%h", "-c", str(concurrency),
               "-P", "prefork", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=settings_env(settings, **extra_env),
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, conn: redis.Redis) -> None:
        key = f"{self.settings.key_prefix}:worker:{self.name}@{socket.gethostname()}"

        def ready() -> bool:
            assert self.proc.poll() is None, f"worker died:\n{self.log.read_text()[-3000:]}"
            return bool(conn.exists(key))

        wait_until(ready, WORKER_START_S, f"worker {self.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Bus:
    """Publishes to and reads from the test's private stream."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.first_entry: dict[str, str] = {}  # event_id -> the entry it was first sent as

    def publish(self, event: dict[str, Any] | str | bytes) -> str:
        raw = event if isinstance(event, (str, bytes)) else json.dumps(event)
        entry = self.conn.xadd(self.settings.event_stream, {"event": raw}).decode()
        if isinstance(event, dict) and isinstance(event.get("event_id"), str):
            self.first_entry.setdefault(event["event_id"], entry)
        return entry

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float = 60,
                   stream: str | None = None, after: str = "0-0") -> dict[str, Any]:
        """Reads the stream (blocking, no sleeps) until an event satisfies `match`."""
        stream = stream or self.settings.event_stream
        deadline = time.monotonic() + timeout
        last = after
        while time.monotonic() < deadline:
            reply = self.conn.xread({stream: last}, count=100, block=500)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    item = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                    try:
                        event = json.loads(item.get("event", "null"))
                    except (ValueError, RecursionError):  # hostile entries are on the stream too
                        event = None
                    data = {**item, "event": event}
                    if match(data):
                        return data
        raise AssertionError(f"no matching entry on {stream} within {timeout}s")

    def result_of(self, event_id: str, timeout: float = 60,
                  after: str | None = None) -> dict[str, Any]:
        """The first event caused by `event_id` (a result or a failure event), read from
        the stream after entry `after`: by default the entry this bus first sent the
        event as (what it causes comes later), else the stream's start. Reading the
        whole shared stream for every result made tests slow and the bench noisy."""
        start = after or self.first_entry.get(event_id, "0-0")
        return self.wait_event(lambda d: isinstance(d["event"], dict)
                               and d["event"].get("causation_id") == event_id, timeout,
                               after=start)["event"]

    def dead_letter(self, entry_id: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait_event(lambda d: d.get("entry_id") == entry_id, timeout,
                               stream=self.settings.dead_stream)


def build_pdf(content: bytes, filters: str | None = None) -> bytes:
    """A minimal one-page PDF with `content` as its page's content stream (offsets computed),
    optionally declared as encoded with `filters` (e.g. "/FlateDecode")."""
    declared = b" /Filter " + filters.encode() if filters else b""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d%s >>\nstream\n" % (len(content), declared) + content
               + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def http_status(url: str, login: str | None = None, timeout: float = 10) -> int:
    """The status a GET answers with (basic auth when `login` is `user:password`); 0 when
    nothing answers."""
    req = urllib.request.Request(url)
    if login:
        req.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class PrivateEngine:
    """A second Docker engine on this machine, with its own socket, data root, exec root
    (and so its own containerd) and its own bridge: another host in everything but the
    kernel. Never `--bridge none`: dockerd then deletes the interface `docker0` even when
    another engine owns it, and the host's containers lose their network. Its bridge is
    made here, with an address of its own, and removed with the engine."""

    def __init__(self, image: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="engine-", dir=session_dir()))
        self.sock = self.root / "docker.sock"
        self.url = f"unix://{self.sock}"
        self.bridge = own_interface()
        self.proc: subprocess.Popen | None = None
        make_bridge(self.bridge)
        try:
            self.start()
            subprocess.run(f"docker save {image} | docker -H {self.url} load -q", shell=True,
                           check=True, capture_output=True, timeout=300)
        except BaseException:
            self.destroy()
            raise

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["dockerd", "--host", self.url, "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "pid"),
             "--bridge", self.bridge, "--iptables=false", "--ip6tables=false",
             "--ip-forward=false", "--ip-masq=false", "--log-level", "warn"],
            stdout=(self.root / "dockerd.log").open("ab"), stderr=subprocess.STDOUT)
        wait_until(self.answers, 60, "the private Docker engine")

    def answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, \
            (self.root / "dockerd.log").read_text()[-3000:]
        return subprocess.run(["docker", "-H", self.url, "info"], capture_output=True,
                              check=False).returncode == 0

    def stop(self) -> None:
        """SIGTERM: the engine stops its containers and exits, as on a host's shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def destroy(self) -> None:
        self.stop()
        subprocess.run(["ip", "link", "delete", self.bridge], check=False,
                       capture_output=True)
        unmount_under(self.root)
        subprocess.run(["rm", "-rf", str(self.root)], check=False)


def unmount_under(root: Path) -> None:
    """What a stopped engine left mounted under its directory (the overlay of a container
    it was creating as it stopped), deepest first, so that the directory can go."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def make_bridge(name: str) -> None:
    """A bridge interface with a /24 that no interface or route of the host uses."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                          text=True, check=True).stdout
    for third in random.sample(range(1, 255), 254):
        prefix = f"10.231.{third}"
        if f"{prefix}." not in used:
            break
    else:
        raise RuntimeError("no free 10.231.x.0/24 for a private engine's bridge")
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", f"{prefix}.1/24", "dev", name], check=True)


def processes(container: Any, columns: str) -> list[list[str]]:
    """`docker top` of a container listed a moment ago: none when it has stopped or gone
    since (the engine answers 409 or 404), as a run that just ended has."""
    try:
        return container.top(ps_args=f"-eo {columns}")["Processes"] or []
    except docker.errors.APIError as exc:
        if exc.status_code in (404, 409):
            return []
        raise


def running_a_plugin(container: Any, event_id: str | None = None) -> bool:
    """Whether a (runc) container's plugin process runs now (with `event_id`: for that
    event). A cold container's is `python main.py`; a prewarmed one's interpreter was
    started ahead (`python /titan/zygote.py`, as in an idle one), so it runs a plugin once
    its inbox holds an event and until the launcher has ended the run (only the launcher
    is left then; on a loaded machine, a moment after the run's record is stored)."""
    args = [" ".join(p) for p in processes(container, "pid,args")]
    mounts = {m.get("Destination"): m["Source"] for m in container.attrs.get("Mounts", [])}
    if any("main.py" in a for a in args):  # cold: its event file is mounted
        return event_id is None or event_of(mounts.get(EVENT_PATH)) == event_id
    if INBOX not in mounts or not any(ZYGOTE_PATH in a for a in args):
        return False
    found = event_of(os.path.join(mounts[INBOX], "event.json"))
    return found is not None and (event_id is None or found == event_id)


def event_of(path: str | None) -> str | None:
    """The id of the event in a run's event file, or None (not there, or not yet whole)."""
    try:
        return json.loads(Path(path or "/nonexistent").read_text()).get("event_id")
    except (OSError, ValueError, AttributeError):
        return None
