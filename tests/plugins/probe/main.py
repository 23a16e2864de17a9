"""Reports the sandbox as seen from inside: identity, limits, filesystem, network, env."""
import json
import os
import resource
import socket


def read(path):
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        return f"error: {exc.strerror}"


def can_write(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        return True
    except OSError:
        return False


def can_connect(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


EVENT = json.loads(os.environ["EVENT_DATA"])
status = dict(line.split(":\t", 1) for line in read("/proc/self/status").splitlines()
              if ":\t" in line)
report = {
    "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
    "cap_eff": status.get("CapEff", "").strip(),
    "no_new_privs": status.get("NoNewPrivs", "").strip(),
    "pids_max": read("/sys/fs/cgroup/pids/pids.max") if os.path.exists("/sys/fs/cgroup/pids")
    else read("/sys/fs/cgroup/pids.max"),
    "memory_limit": read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if os.path.exists("/sys/fs/cgroup/memory") else read("/sys/fs/cgroup/memory.max"),
    "memsw_limit": read("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
    "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    if os.path.exists("/sys/fs/cgroup/cpu") else read("/sys/fs/cgroup/cpu.max"),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
    "core": resource.getrlimit(resource.RLIMIT_CORE)[0],
    "pid1": read("/proc/1/cmdline").replace("\x00", " "),
    "write_root": can_write("/evil"), "write_code": can_write("main.py"),
    "write_etc": can_write("/etc/passwd"), "write_tmp": can_write("/tmp/ok"),
    "tmp_mount": [ln for ln in read("/proc/mounts").splitlines() if " /tmp " in ln],
    "shm_mount": [ln for ln in read("/proc/mounts").splitlines() if " /dev/shm " in ln],
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "connect_redis": can_connect("127.0.0.1", int(EVENT["payload"].get("port", 6379))),
    "env": sorted(os.environ),
    "docker_sock": os.path.exists("/var/run/docker.sock"),
}
print(json.dumps({"topic": "test.v1", "event_type": "probe_report", "payload": report}))
