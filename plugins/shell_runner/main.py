#!/usr/bin/env python3
"""shell_runner: system.v1/run_cmd -> system.v1/cmd_result. No shell is ever involved:
the command is split into argv, its program must be whitelisted and each flag known to
be harmless; anything a shell would interpret is refused with the reason in the result."""

import json
import os
import shlex
import subprocess
import sys

FORBIDDEN = {";": "';'", "|": "'|'", "&": "'&'", "$": "'$' (substitution)", "`": "backticks",
             "<": "redirection", ">": "redirection", "\n": "a newline",
             "\r": "a carriage return", "\x00": "a NUL byte", "\\": "a backslash"}
FLAGS = {
    "ls": {"-l", "-a", "-A", "-h", "-1", "-t", "-r", "-S", "-d", "-F", "-i", "-n", "-la",
           "-al", "-lh", "-hl", "-lah", "-alh"},
    "df": {"-h", "-k", "-T", "-i", "-P", "-a", "-hT", "-Th"},
    "uname": {"-a", "-s", "-n", "-r", "-v", "-m", "-p", "-i", "-o"},
    "uptime": {"-p", "-s"},
    "date": {"-u", "-R", "-I", "--utc", "--iso-8601", "--rfc-3339=seconds", "--rfc-3339=date"},
    "pwd": {"-L", "-P"},
    "whoami": set(),
    "echo": {"-n"},
}
MAX_COMMAND = 1000
MAX_OUTPUT = 64 * 1024
TIMEOUT_S = 10


def refusal(command: object, reason: str) -> dict:
    return {"command": command, "exit_code": None, "refused": True, "reason": reason,
            "stdout": "", "stderr": reason}


def check(command: object) -> list[str] | str:
    """argv when allowed, else the reason it is refused."""
    if not isinstance(command, str) or not command.strip():
        return "payload.command must be a non-empty string"
    if len(command) > MAX_COMMAND:
        return f"command is longer than {MAX_COMMAND} characters"
    for ch, name in FORBIDDEN.items():
        if ch in command:
            return f"{name} is not allowed: commands run without a shell"
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return f"cannot parse command: {exc}"
    program, args = argv[0], argv[1:]
    if "/" in program:
        return f"path-qualified programs are not allowed ({program!r}); use the bare name"
    if program not in FLAGS:
        return f"{program!r} is not an allowed command; allowed: {', '.join(sorted(FLAGS))}"
    for arg in args:
        if program == "echo":
            # echo reads only leading -n/-e/-E words as options; -e would expand escapes.
            if arg.startswith("-") and arg[1:] and set(arg[1:]) <= set("neE") and arg != "-n":
                return f"flag {arg!r} is not allowed for echo (escape expansion is refused)"
        elif arg.startswith("-"):
            if arg not in FLAGS[program]:
                return f"flag {arg!r} is not allowed for {program}"
        elif program == "date":
            if not arg.startswith("+"):
                return (f"date takes only flags and +FORMAT, not {arg!r} "
                        "(setting the clock is refused)")
        elif program != "ls":
            return f"{program} takes no arguments besides flags"
    return argv


def main() -> None:
    with open(os.environ["EVENT_FILE"], encoding="utf-8") as fh:
        event = json.load(fh)
    command = event.get("payload", {}).get("command")
    argv = check(command)
    if isinstance(argv, str):
        payload = refusal(command, argv)
    else:
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S, check=False,
                                  shell=False, stdin=subprocess.DEVNULL)
            payload = {"command": command, "exit_code": proc.returncode, "refused": False,
                       "stdout": proc.stdout[:MAX_OUTPUT].decode("utf-8", "replace"),
                       "stderr": proc.stderr[:MAX_OUTPUT].decode("utf-8", "replace")}
        except FileNotFoundError:
            payload = refusal(command, f"{argv[0]} is not installed in the runtime image")
        except subprocess.TimeoutExpired:
            payload = refusal(command, f"command timed out after {TIMEOUT_S}s")
    print(json.dumps({"topic": "system.v1", "event_type": "cmd_result", "payload": payload}))
    sys.exit(0)


if __name__ == "__main__":
    main()
