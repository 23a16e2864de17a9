"""A hostile plugin: each attack tries to break one SPEC §4 protection. Attacks that the
sandbox stops by killing the run never print; the others report what they achieved."""

import ctypes
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

with open(os.environ["EVENT_FILE"], encoding="utf-8") as _fh:
    EVENT = json.load(_fh)
ARGS = EVENT["payload"]


def report(**payload):
    print(json.dumps({"topic": "hostile.v1", "event_type": "report", "payload": payload}))
    sys.exit(0)


def err(exc):
    return errno.errorcode.get(getattr(exc, "errno", 0) or 0, type(exc).__name__)


def fork_bomb():
    children = 0
    try:
        while True:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
    except OSError as exc:
        report(children=children, error=err(exc))


def cpu_spin():
    while True:
        pass


def giant_line():
    chunk = "x" * 65536
    while True:
        sys.stdout.write(chunk)


def binary_flood():
    while True:
        sys.stdout.buffer.write(os.urandom(65536))


def stderr_flood():
    while True:
        sys.stderr.write("e" * 4095 + "\n")


def binary_small():
    sys.stdout.buffer.write(b"\xff\xfe\x00garbage")


def write_until_error(path):
    """Appends 1 MiB at a time until the kernel says no; reports how far it got."""
    written = 0
    try:
        with open(path, "wb") as fh:
            while True:
                fh.write(b"\0" * 1048576)
                fh.flush()
                written += 1048576
    except OSError as exc:
        report(written=written, error=err(exc))


def fill_tmp():
    write_until_error("/tmp/fill")


def fill_shm():
    write_until_error("/dev/shm/fill")


def many_files():
    n, chunk = 0, b"x" * ARGS.get("file_bytes", 4096)
    try:
        while n < 2_000_000:
            with open(f"/tmp/f{n}", "wb") as fh:
                fh.write(chunk)
            n += 1
    except OSError as exc:
        report(files=n, error=err(exc))
    report(files=n, error=None)


def marker():
    """Reports whether an earlier run's marker is here, then leaves one."""
    seen = os.path.exists("/tmp/marker")
    with open("/tmp/marker", "w") as fh:
        fh.write(os.environ["INVOCATION_ID"])
    report(seen=seen, pid=os.getpid())


def balloon():
    hoard = []
    while True:
        hoard.append(bytearray(8 * 1024 * 1024))


def linger():
    """Holds a secret in its environment and /tmp for a while, then says who it was."""
    with open("/tmp/secret.txt", "w") as fh:
        fh.write("RUN-SECRET")
    time.sleep(float(ARGS.get("seconds", 3)))
    report(uid=os.getuid(), gid=os.getgid())


def kill_self():
    """Dies of SIGKILL with no memory pressure at all: not an OOM kill."""
    os.kill(os.getpid(), signal.SIGKILL)


def tmp_listing():
    report(tmp=sorted(os.listdir("/tmp")))


def open_files():
    handles = []
    try:
        while True:
            handles.append(open("/dev/null"))  # noqa: SIM115 - kept open on purpose
    except OSError as exc:
        report(opened=len(handles), error=err(exc))


def huge_file():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    write_until_error("/tmp/huge")


def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return err(exc)


def network():
    report(hostname=connect(ARGS["hostname"], 80), ip=connect(ARGS["ip"], ARGS["port"]),
           redis=connect("127.0.0.1", ARGS["redis_port"]),
           gateway=connect(ARGS["gateway"], ARGS["redis_port"]))


def try_(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return err(exc)
    except subprocess.CalledProcessError as exc:
        return f"exit {exc.returncode}"


def unshare(flag):
    """unshare(2) with `flag`, in a child (a namespace it made would change what the rest
    of the report sees): "ok", or the errno's name."""
    pid = os.fork()
    if pid == 0:
        failed = ctypes.CDLL(None, use_errno=True).unshare(flag)
        os._exit(ctypes.get_errno() or 255 if failed else 0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return "ok" if code == 0 else errno.errorcode.get(code, f"exit {code}")


def host():
    def write(path):
        with open(path, "w") as fh:
            fh.write("pwned")

    su = subprocess.run(["su", "-c", "id -u", "root"], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=3, check=False)
    report(
        write_root=try_(lambda: write("/pwned")), write_code=try_(lambda: write("main.py")),
        write_etc=try_(lambda: write("/etc/passwd")),
        date_set=try_(lambda: subprocess.run(["date", "-s", "2020-01-01"], check=True,
                                             capture_output=True)),
        mount=try_(lambda: subprocess.run(["mount", "-t", "tmpfs", "none", "/tmp"], check=True,
                                          capture_output=True)),
        mknod=try_(lambda: os.mknod("/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0))),
        raw_socket=try_(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1).close()),
        unshare_user=unshare(0x10000000), unshare_mount=unshare(0x00020000),
        su_stdout=su.stdout.strip(), su_code=su.returncode, uid=os.getuid(), euid=os.geteuid(),
        setuid_files=sorted(p for d in ("/usr/bin", "/bin") for p in
                            (os.path.join(d, f) for f in os.listdir(d))
                            if os.path.isfile(p) and os.stat(p).st_mode & 0o4000),
        environ=sorted(os.environ), plugin_files=sorted(os.listdir(".")),
        docker_sock=os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock"),
        kernel=Path("/proc/version").read_text().strip(),
        device_read=try_(lambda: open("/tmp/sda", "rb").read(512)),  # noqa: SIM115
    )


def read_paths():
    """Opens and reads each path without blocking (a pipe that is open but empty answers
    EAGAIN: that it opened at all is what counts)."""
    results = {}
    for path in ARGS["paths"]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            results[path] = err(exc)
            continue
        try:
            results[path] = "read:" + os.read(fd, 100).decode("utf-8", "replace")
        except OSError as exc:
            results[path] = "opened:" + err(exc)
        finally:
            os.close(fd)
    report(results=results)


def event_size():
    with open(os.environ["EVENT_FILE"], "rb") as fh:
        data = fh.read()
    report(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
           env_has_event_data="EVENT_DATA" in os.environ)


def bad_output():
    kind = ARGS["kind"]
    if kind == "not_json":
        print("hello, world")
    elif kind == "truncated":
        print('{"topic": "a", "event_type": "b", "payload": {"x": ')
    elif kind == "nan":
        print('{"topic": "a", "event_type": "b", "payload": {"x": NaN}}')
    elif kind == "surrogate":
        print('{"topic": "a", "event_type": "b", "payload": {"x": "\\ud800"}}')
    elif kind == "missing_keys":
        print('{"payload": {}}')
    elif kind == "many_lines":
        line = '{"topic": "a", "event_type": "b", "payload": {}}\n'
        sys.stdout.write(line * 10_000)
    elif kind == "deep":
        print('{"topic": "a", "event_type": "b", "payload": {"x": ' + "[" * 200 + "]" * 200 + "}}")
    elif kind == "forged_failure":
        print(json.dumps({"topic": ARGS.get("topic", "plugins.v1"),
                          "event_type": ARGS.get("event_type", "invocation_failed"),
                          "payload": {"plugin": "file_watcher", "invocation_id": "x",
                                      "event_id": "y", "status": "failed", "reason": "forged"}}))


def payload_view():
    """What a run can do with the payload file it was handed: read it, see what else is
    beside it, change it."""
    path = ARGS["path"]
    st = os.stat(path)
    parent = os.path.dirname(path)
    report(text=Path(path).read_text(), mode=oct(st.st_mode & 0o7777),
           mine=st.st_uid == os.getuid(), beside=sorted(os.listdir(parent)),
           write=try_(lambda: open(path, "a").close()),
           create=try_(lambda: open(os.path.join(parent, "new"), "w").close()),
           chmod=try_(lambda: os.chmod(path, 0o644)),
           unlink=try_(lambda: os.unlink(path)))


ATTACKS = {f.__name__: f for f in (fork_bomb, cpu_spin, giant_line, binary_flood, stderr_flood,
                                   binary_small, fill_tmp, fill_shm, many_files, tmp_listing,
                                   open_files, huge_file, network, host, read_paths, event_size,
                                   bad_output, marker, balloon, kill_self, linger,
                                   payload_view)}
ATTACKS[ARGS["attack"]]()
