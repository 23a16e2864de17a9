"""The seccomp profile of a gVisor container.

runsc applies a container's profile only with `--oci-seccomp` (scripts/services.sh
registers it so), and then in its own kernel, with two differences from runc that break
the engine's default profile there: a rule's `errnoRet` is ignored (every refusal is
EPERM, so `clone3`, which the default answers with ENOSYS for glibc to fall back to
`clone`, fails and no thread can start), and a name that runsc spells differently is
dropped (`pselect6`: Python's `select.select` fails). Measured: under runsc with the
default profile, `threading.Thread.start` and `select.select` fail with EPERM.

So gVisor's containers get this profile instead: everything gVisor's kernel implements
(itself a short list) is allowed, except what the engine's default refuses to a container
without capabilities: namespaces (`unshare`, `setns`, `clone` with any CLONE_NEW* flag),
mounts, keyrings, BPF, perf, userfaultfd, module and clock changes, other processes'
memory. `clone3` is answered ENOSYS (SCMP_ACT_TRACE with no tracer), as by the engine's
default under runc. A name gVisor does not know is a call it does not implement.
"""

from __future__ import annotations

import functools
import json

DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "get_mempolicy", "init_module", "io_uring_enter", "io_uring_register",
    "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl",
    "lookup_dcookie", "mbind", "mount", "mount_setattr", "move_mount", "move_pages",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open",
    "pivot_root", "process_vm_readv", "process_vm_writev", "query_module", "quotactl",
    "reboot", "request_key", "set_mempolicy", "setns", "settimeofday", "swapoff", "swapon",
    "syslog", "sysfs", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vhangup",
    "_sysctl",
)
# clone's flags (its first argument on x86-64 and arm64) that make a namespace
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000)


@functools.cache
def profile() -> str:
    """The profile, as the engine takes it (`security_opt: seccomp=<json>`)."""
    rules = [{"names": list(DENIED), "action": "SCMP_ACT_ERRNO"}]
    rules += [{"names": ["clone"], "action": "SCMP_ACT_ERRNO",
               "args": [{"index": 0, "value": flag, "valueTwo": flag,
                         "op": "SCMP_CMP_MASKED_EQ"}]} for flag in NAMESPACE_FLAGS]
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_TRACE"})
    return json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules})


def security_opt(runtime: str | None) -> list[str]:
    """What a container of `runtime` adds to its security options."""
    return [f"seccomp={profile()}"] if runtime else []
