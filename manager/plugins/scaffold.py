"""`titan-plugins new`: a plugin directory that validates and runs as it is, with every
manifest key written out and commented (defaults and the operator's limits)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from manager.core.config import Settings
from manager.plugins.manifest import NAME_RE
from manager.plugins.safefs import O_DIR, fd

MANIFEST = """\
# {name}: a Titan plugin. Every key is here; unknown keys are errors.
name: {name}                   # must equal the directory name; [a-z][a-z0-9_]{{0,63}}
version: 0.1.0                 # semantic version, shown in /plugins and in result events
draft: true                    # out of service until you delete this line, then reload
description: Says what {name} does
triggers:                      # at least one: events or timers
{triggers}entrypoint: python main.py     # split like a shell would, never run by a shell
image: {image}   # the runtime image (make up builds it)
timeout: 30                    # seconds; default 30, at most {max_timeout}
retries: 0                     # re-runs after failed, timeout or oom; 0 to 10
prewarm: true                  # false: every run starts a cold container
isolation: container           # gvisor: also a user-space kernel (gVisor) in between
# concurrency: 1               # optional: at most this many runs at once, on all workers
weight: 1                      # turns in the queue vs other plugins (1 to 10; 2: twice)
resources:
  cpu: "500m"                  # millicores ("250m") or cores ("0.5"); at most {max_cpu}m
  memory: "256Mi"              # Ki/Mi/Gi or K/M/G; from 6Mi to {max_memory}
permissions:
  fs:
    allow: []                  # host paths to read, as globs under {roots}
                               # e.g. ["{example_root}/files/**"]
  net:
    allow: []                  # host:port to reach through the egress proxy, within
                               # the operator's ceiling: {ceiling}
secrets: []                    # secrets to read at /run/secrets/<name> (secret set)
"""

COMMENT_AT = 31  # the column the scaffold's comments start at
EVENT_TRIGGER = """\
{topic_line}# exact names or globs ("fs.*", "*")
    event_type: {event_type}
  # - every: 5m                # or timers: every 30s, 5m, 1h or 1d (at most 366d), or
  #   schedule: "0 9 * * *"    # a cron line instead (5 fields, 6 with seconds, @daily)
  #   timezone: UTC            # (cron only) an IANA time zone
  #   payload: {{}}              # the tick event's payload (plugin, timer, ... added)
  #   catch_up: last           # after missed ticks: one late tick (last), or none
"""
TIMER_TRIGGER = """\
{clock_line}# or events: topic and event_type, exact names or globs
    payload: {{}}                # the tick event's payload (plugin, timer, ... added)
    catch_up: last             # after missed ticks: one late tick (last), or none
    # timezone: UTC            # (cron only) an IANA time zone
"""

MAIN = '''\
"""{name}: reads the event and prints one result.

In:  EVENT_FILE (the event as a JSON file; EVENT_DATA holds it too when small),
     PLUGIN_NAME, PLUGIN_VERSION, INVOCATION_ID.
Out: one JSON object per line on stdout, each with topic, event_type and payload.
     stderr is the plugin's log (python3 titan-plugins.py logs {name}).
"""

import json
import os
import sys

with open(os.environ["EVENT_FILE"], encoding="utf-8") as fh:
    event = json.load(fh)

print(f"{{os.environ['PLUGIN_NAME']}} handling {{event['event_id']}}", file=sys.stderr)
print(json.dumps({{
    "topic": "{topic}",
    "event_type": "{event_type}_handled",
    "payload": {{"received": event.get("payload", {{}})}},
}}))
'''

README = """\
# {name}

Runs on {runs_on} and publishes `{topic}`/`{event_type}_handled`.

It is a draft until the line `draft: true` is deleted from `plugin.yaml`: reloads leave
a draft out of service, so nothing runs it before it is ready.

```bash
python3 titan-plugins.py run {path} -e @{path}/event.json   # one local sandboxed run
sed -i '/^draft: true/d' {path}/plugin.yaml                 # ready: out of draft
python3 titan-plugins.py reload                             # load it into the running stack
python3 titan-plugins.py trigger {name} --wait -e @{path}/event.json
python3 titan-plugins.py logs {name}
```

`requirements.txt` (optional) lists the Python packages it imports, one requirement per
line (wheels only, installed outside the sandbox).
"""


def _mib(n: int) -> str:
    return f"{n // 1024**3}Gi" if n % 1024**3 == 0 else f"{n // 1024**2}Mi"


def triggers_of(topic: str, event_type: str, clock: str | None) -> str:
    """The scaffold's triggers: the event's, or the timer's (`every: 5m`, `schedule: ...`),
    the other kind shown commented."""
    if clock is None:
        return EVENT_TRIGGER.format(topic_line=f"  - topic: {topic}".ljust(COMMENT_AT),
                                    event_type=event_type)
    return TIMER_TRIGGER.format(clock_line=f"  - {clock}".ljust(COMMENT_AT))


def timer_clock(every: str | None, cron: str | None) -> str | None:
    """`every: 5m` or `schedule: "0 * * * *"` as plugin.yaml takes it, checked by the
    rules of a reload; None for an event plugin. Raises ValueError naming the problem."""
    from pydantic import ValidationError

    from manager.plugins.schedule import schedule_of
    from manager.plugins.yaml_strict import plain

    if every and cron:
        raise ValueError("--every and --schedule: one clock per timer, choose one")
    if not (every or cron):
        return None
    try:
        schedule_of(str(every or cron))
    except ValidationError as exc:
        raise ValueError("; ".join(plain(e) for e in exc.errors())) from None
    return f"every: {every}" if every else f"schedule: {json.dumps(cron)}"


def scaffold(plugins_dir: Path, name: str, topic: str, event_type: str,
             settings: Settings, clock: str | None = None) -> Path:
    """Writes plugins_dir/name (with `clock`, see timer_clock, a timer plugin); raises
    ValueError for a bad name or an existing directory."""
    if not re.fullmatch(NAME_RE, name):
        raise ValueError(f"{name!r} is not a valid plugin name ([a-z][a-z0-9_]{{0,63}})")
    for label, value in (("topic", topic), ("event type", event_type)):
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", value):
            raise ValueError(f"{label} {value!r} must be 1-100 chars from [A-Za-z0-9._-]")
    target = plugins_dir / name
    roots = ", ".join(str(r) for r in settings.allowed_roots) or "(none granted)"
    ceiling = ", ".join(settings.egress_allow) or "empty (TITAN_EGRESS_ALLOW)"
    values = {"name": name, "topic": topic, "event_type": event_type, "ceiling": ceiling,
              "image": settings.runtime_image, "max_timeout": settings.max_timeout,
              "max_cpu": settings.max_cpu_millis, "max_memory": _mib(settings.max_memory_bytes),
              "roots": roots, "path": target, "triggers": triggers_of(topic, event_type, clock),
              "runs_on": f"`{topic}`/`{event_type}` events" if clock is None else
              f"a timer (`{clock}`)",
              "example_root": settings.allowed_roots[0] if settings.allowed_roots else "/srv"}
    event = ({"topic": topic, "event_type": event_type,
              "payload": {"text": "hello from the sample event"}} if clock is None else
             {"topic": "timer.v1", "event_type": "tick", "payload": {"plugin": name}})
    files = {"plugin.yaml": MANIFEST.format(**values), "main.py": MAIN.format(**values),
             "README.md": README.format(**values),
             "event.json": json.dumps(event, indent=2) + "\n"}
    plugins_dir.mkdir(parents=True, exist_ok=True)
    with fd(os.open(plugins_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as parent:
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            raise ValueError(f"{target} already exists") from None
        with fd(os.open(name, O_DIR, dir_fd=parent)) as directory:
            for file_name, text in files.items():
                try:
                    write_new(directory, file_name, text.encode())
                except FileExistsError:  # someone else's symlink or file, planted meanwhile
                    raise ValueError(f"{target / file_name} appeared while the plugin was "
                                     "being created; nothing was written through it") from None
    return target


def write_new(directory: int, name: str, data: bytes) -> None:
    """Creates `name` in an open directory: never through a symlink planted meanwhile, never
    over an existing file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with fd(os.open(name, flags, 0o644, dir_fd=directory)) as out:
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
