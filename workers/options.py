"""Container options, in two parts: what a plugin's configuration fixes (`base`: every
SPEC §4 protection, the image, the limits, the code, requirements and allowed directories)
and what one run adds (`per_run`: its invocation, its event, a payload copy). A cold
container is base + per_run; a prewarmed one is base + the launcher, and receives the
per-run part through the launcher, so nothing of one run is ever baked into a container
made ahead of it. A manifest has no way to loosen any of it."""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil
from docker.types import Mount, Ulimit

from manager.core.groups import SandboxSettings
from manager.core.runs import RunUser
from manager.plugins.safefs import mkdirs, private_root
from workers import gvisor_seccomp
from workers.run_spec import PoolConfig, RunSpec

LABEL = "titan.managed"
LABEL_INSTANCE = "titan.instance"
LABEL_HOST = "titan.host"
LABEL_PID = "titan.worker_pid"
LABEL_START = "titan.worker_start"  # with the pid: the owner, safe against pid reuse
LABEL_INVOCATION = "titan.invocation"
LABEL_PLUGIN = "titan.plugin"
LABEL_POOL = "titan.pool"  # a prewarmed container, owned by its worker process
LABEL_UID = "titan.uid"  # the host uid it runs as (workers.identity)
LABEL_CONTAINER = "titan.worker_container"  # the worker's own container (workers.home)
CODE_DIR = "/plugin"
DEPS_DIR = "/titan/deps"
EVENT_PATH = "/titan/event.json"
MAX_ENV_EVENT = 96 * 1024  # larger events are read from EVENT_FILE only
# Under gVisor the engine's pids limit counts the sandbox's host threads, not the plugin's
# processes: its kernel holds about 40 when idle and about 5 more per plugin process
# (measured: 37 idle, 191 with 31 processes). The limit is set so that the plugin gets
# about as many processes as under runc; a lower one kills the sandbox itself (exit 2).
GVISOR_PIDS_BASE = 64
GVISOR_PIDS_PER_PROCESS = 6


def bind(target: str, source: str) -> Mount:
    """A read-only bind mount that does not carry the mounts below its source along."""
    mount = Mount(target, source, type="bind", read_only=True)
    mount["BindOptions"] = {"NonRecursive": True}
    return mount


def run_env(spec: RunSpec) -> dict[str, str]:
    """The run's own environment: its invocation id, and the event itself when it is small
    enough for one variable (EVENT_FILE always has it)."""
    env = {"INVOCATION_ID": spec.invocation_id, **dict(spec.proxy_env)}
    if len(spec.event_json.encode()) <= MAX_ENV_EVENT:
        env["EVENT_DATA"] = spec.event_json
    return env


def base(config: PoolConfig, settings: SandboxSettings, labels: dict[str, str], user: RunUser,
         accounts: dict[str, str]) -> dict[str, Any]:
    """Everything a plugin's configuration fixes, for a container running as `user` (with
    `accounts`, its /etc/passwd and /etc/group: workers.identity.account_files)."""
    s, limits = settings, config.limits
    # USER and LOGNAME: the run's uid has no passwd entry in the image (getpass reads these)
    env = {"EVENT_FILE": EVENT_PATH, "PLUGIN_NAME": config.plugin,
           "PLUGIN_VERSION": config.version, "HOME": "/tmp", "USER": "plugin",
           "LOGNAME": "plugin", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    mounts = [bind(CODE_DIR, config.code_dir)]
    if config.deps_dir:
        mounts.append(bind(DEPS_DIR, config.deps_dir))
        env["PYTHONPATH"] = DEPS_DIR
    mounts += [bind(d, d) for d in config.read_only_dirs]
    mounts += [bind(target, source) for target, source in accounts.items()]
    if config.network:
        mounts.append(bind("/etc/resolv.conf", no_resolver(s)))
    tmp = "rw,noexec,nosuid,nodev,mode=1777"
    # tmpfs pages are charged to the container's memory: filling /tmp (at most half of it)
    # and /dev/shm (at most an eighth) must end in ENOSPC, not in an OOM kill.
    tmpfs = min(s.tmpfs_bytes, limits.memory_bytes // 2)
    shm = min(s.shm_bytes, limits.memory_bytes // 8)
    return {
        "image": config.image, "command": list(config.argv), "environment": env,
        "working_dir": CODE_DIR, "user": user.docker,
        "network_mode": config.network or "none",
        "read_only": True, "mounts": mounts,
        "tmpfs": {"/tmp": f"{tmp},size={tmpfs},nr_inodes={s.tmpfs_inodes}",
                  "/dev/shm": f"{tmp},size={shm},nr_inodes=256"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges", *gvisor_seccomp.security_opt(config.runtime)],
        "pids_limit": host_pids(config), "mem_limit": limits.memory_bytes,
        "memswap_limit": limits.memory_bytes, "nano_cpus": limits.cpu_millis * 1_000_000,
        "ulimits": [Ulimit(name="nofile", soft=s.nofile, hard=s.nofile),
                    Ulimit(name="fsize", soft=s.fsize_bytes, hard=s.fsize_bytes),
                    Ulimit(name="core", soft=0, hard=0)],
        "init": True, "ipc_mode": "none", "log_config": {"type": "none", "config": {}},
        "stdin_open": False, "tty": False, "hostname": "plugin",
        "labels": {**labels, **owner_labels(), LABEL_PLUGIN: config.plugin,
                   LABEL_UID: user.label},
        **({"runtime": config.runtime} if config.runtime else {}),
    }


def no_resolver(settings: SandboxSettings) -> str:
    """/etc/resolv.conf for a container on the egress network: a resolver that is not
    there, so a lookup fails at once (names are the proxy's to resolve; the engine's own
    resolver on an internal network answers nothing but waits seconds for that)."""
    path = mkdirs(private_root(settings.cache_dir) / "tools", 0o755) / "resolv.conf"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # the pool's
        # thread writes it too
        tmp.write_text("# Titan: names are the egress proxy's to resolve (HTTP_PROXY)\n"
                       "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        tmp.chmod(0o444)
        os.replace(tmp, path)
    return str(path)


def host_pids(config: PoolConfig) -> int:
    """The engine's pids limit for this configuration's containers."""
    pids = max(1, config.limits.pids)
    return GVISOR_PIDS_BASE + GVISOR_PIDS_PER_PROCESS * pids if config.runtime else pids


def cold(spec: RunSpec, settings: SandboxSettings, labels: dict[str, str]) -> dict[str, Any]:
    """A cold container: the configuration's options plus the run's own."""
    assert spec.user is not None, "a cold container runs as the identity taken for its run"
    options = base(spec.config, settings, labels, spec.user, spec.accounts)
    options["environment"].update(run_env(spec))
    options["mounts"].append(bind(EVENT_PATH, spec.event_file))
    if spec.payload:
        options["mounts"].append(bind(spec.payload[1], spec.payload[0]))
    options["labels"][LABEL_INVOCATION] = spec.invocation_id
    return options


def owner_labels() -> dict[str, str]:
    """This process as the owner of a container: its pid and when it started."""
    return {LABEL_PID: str(os.getpid()), LABEL_START: started(os.getpid())}


def started(pid: int) -> str:
    """A process's start time, in clock ticks since boot (the label's format since the
    first version): a reused pid gets another."""
    try:
        since_boot = psutil.Process(pid).create_time() - psutil.boot_time()
    except (psutil.Error, ValueError):
        return ""
    return str(round(since_boot * os.sysconf("SC_CLK_TCK")))


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as dead."""
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False
