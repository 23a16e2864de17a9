"""plugin.yaml -> a frozen, validated Manifest (SPEC §3 and the load-time rules of §4)."""

from __future__ import annotations

import json
import shlex
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from manager.core import netrules
from manager.core.errors import ManifestError
from manager.core.groups import LimitSettings
from manager.core.runs import Isolation, RunLimits
from manager.plugins.globs import check_classes, check_glob
from manager.plugins.quantities import parse_cpu, parse_memory
from manager.plugins.schedule import Schedule
from manager.plugins.yaml_strict import (
    StrictLoader,
    format_error,
    positions,
    yaml_place,
    yaml_problem,
)

NAME_RE = r"^[a-z][a-z0-9_]{0,63}$"
SEMVER_RE = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
PATTERN_RE = r"^[A-Za-z0-9._*?\[\]-]{1,128}$"
SECRET_RE = r"^[a-z][a-z0-9_]{0,63}$"
MANIFEST_NAME = "plugin.yaml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Trigger(_Model):
    topic: Annotated[str, Field(pattern=PATTERN_RE)]
    event_type: Annotated[str, Field(pattern=PATTERN_RE)]

    @field_validator("topic", "event_type")
    @classmethod
    def _classes(cls, value: str) -> str:
        check_classes(value)
        return value


def _trigger_kind(value: Any) -> str:
    """An item with `schedule` or `every` is a timer; any other, an event trigger."""
    if isinstance(value, dict):
        return "on_schedule" if {"schedule", "every"} & set(value) else "on_event"
    return "on_schedule" if isinstance(value, Schedule) else "on_event"


TRIGGER_KINDS = ("on_event", "on_schedule")  # in a validation error's place: not a key
AnyTrigger = Annotated[
    Annotated[Trigger, Tag("on_event")] | Annotated[Schedule, Tag("on_schedule")],
    Discriminator(_trigger_kind)]


class Resources(_Model):
    cpu: str = "500m"
    memory: str = "256Mi"

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str) -> str:
        parse_cpu(value)
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        parse_memory(value)
        return value


class FsPermissions(_Model):
    allow: tuple[str, ...] = ()

    @field_validator("allow")
    @classmethod
    def _globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for glob in value:
            check_glob(glob)
        return value


class NetPermissions(_Model):
    """host:port patterns the plugin asks to reach through the egress proxy; the operator's
    ceiling (TITAN_EGRESS_ALLOW) decides at load whether it may (manager.core.netrules)."""

    allow: Annotated[tuple[str, ...], Field(max_length=64)] = ()

    @field_validator("allow")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            netrules.parse(pattern)
        return tuple(p.strip().lower() for p in value)


class Permissions(_Model):
    fs: FsPermissions = FsPermissions()
    net: NetPermissions = NetPermissions()


class Manifest(_Model):
    name: Annotated[str, Field(pattern=NAME_RE)]
    version: Annotated[str, Field(pattern=SEMVER_RE)]
    description: Annotated[str, Field(max_length=1000)] = ""
    triggers: Annotated[tuple[AnyTrigger, ...], Field(min_length=1, max_length=64)]
    entrypoint: Annotated[str, Field(min_length=1, max_length=1000)]
    image: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")]
    timeout: Annotated[int, Field(gt=0)] = 30
    retries: Annotated[int, Field(ge=0, le=10)] = 0  # re-runs after failed/timeout/oom
    concurrency: Annotated[int, Field(ge=1, le=1000)] | None = None  # across all workers
    weight: Annotated[int, Field(ge=1, le=10)] = 1  # turns in the queue, relative to others
    prewarm: bool = True  # false: every run starts a cold container
    # true: reloads leave this content out of service (`new` writes it; the author deletes
    # the line when the plugin is ready), so an unfinished plugin never runs by accident
    draft: bool = False
    isolation: Isolation = Isolation.CONTAINER  # gvisor: a user-space kernel in between
    resources: Resources = Resources()
    permissions: Permissions = Permissions()
    # names of operator-set secrets the plugin reads at /run/secrets/<name>
    secrets: Annotated[tuple[Annotated[str, Field(pattern=SECRET_RE)], ...],
                       Field(max_length=32)] = ()

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        entrypoint_argv(value)
        return value

    @property
    def schedules(self) -> tuple[Schedule, ...]:
        return tuple(t for t in self.triggers if isinstance(t, Schedule))

    @cached_property
    def argv(self) -> tuple[str, ...]:
        """Split once per manifest (every run's request carries it)."""
        return tuple(entrypoint_argv(self.entrypoint))

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.resources.memory)

    @property
    def cpu_millis(self) -> int:
        return parse_cpu(self.resources.cpu)

    @property
    def allowed_globs(self) -> tuple[str, ...]:
        return self.permissions.fs.allow

    @property
    def net_allow(self) -> tuple[str, ...]:
        return self.permissions.net.allow

    def over_limits(self, limits: LimitSettings, ceiling: tuple[str, ...]) -> list[str]:
        """What the operator does not allow (SPEC §3: at most the operator's maximum; a
        network only within the egress ceiling, TITAN_EGRESS_ALLOW)."""
        errors = []
        if self.timeout > limits.timeout:
            errors.append(f"timeout: {self.timeout}s is above the maximum {limits.timeout}s")
        if self.memory_bytes > limits.memory_bytes:
            errors.append(f"resources.memory: {self.resources.memory} is above the maximum "
                          f"{limits.memory_bytes} bytes")
        if self.cpu_millis > limits.cpu_millis:
            errors.append(f"resources.cpu: {self.resources.cpu} is above the maximum "
                          f"{limits.cpu_millis}m")
        for pattern in netrules.beyond(ceiling, self.net_allow):
            errors.append(f"permissions.net.allow: {pattern!r} is beyond the operator's "
                          f"ceiling ({', '.join(ceiling) or 'empty: no plugin has a network'}"
                          "); the operator may allow it in TITAN_EGRESS_ALLOW")
        return errors

    def run_limits(self, limits: LimitSettings) -> RunLimits:
        """This manifest's limits, clamped to the operator's maxima."""
        return RunLimits(self.timeout, self.memory_bytes, self.cpu_millis,
                         limits.pids).clamped(limits)


def entrypoint_argv(entrypoint: str) -> list[str]:
    """Splits like a shell, refuses what only a shell would make sense of."""
    try:
        argv = shlex.split(entrypoint)
    except ValueError as exc:
        raise ValueError(f"cannot split entrypoint: {exc}") from exc
    if not argv:
        raise ValueError("entrypoint is empty")
    for arg in argv:
        if "\x00" in arg:
            raise ValueError("entrypoint contains a NUL byte")
        path = PurePosixPath(arg)
        if ".." in path.parts or (path.is_absolute() and arg != argv[0]):
            raise ValueError(f"entrypoint argument {arg!r} points outside the plugin directory")
    return argv


def parse_manifest(text: bytes, path: str, max_bytes: int) -> Manifest:
    """Validates plugin.yaml bytes; raises ManifestError listing every field at fault, each
    as `path:line:column: field: what is wrong` in plain words."""
    if len(text) > max_bytes:
        raise ManifestError(f"{path}: plugin.yaml is {len(text)} bytes, over {max_bytes}", path,
                            [f"file: larger than {max_bytes} bytes"])
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        where = yaml_place(exc, path)
        raise ManifestError(f"{where}invalid YAML: {yaml_problem(exc)}", path,
                            [f"{where}yaml: {yaml_problem(exc)}"]) from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: plugin.yaml must be a mapping", path,
                            ["file: not a YAML mapping"])
    try:
        # JSON mode keeps strict typing ("30" is not a number) while accepting YAML lists.
        return Manifest.model_validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        marks = positions(text)
        found = [{**e, "loc": tuple(p for p in e["loc"] if p not in TRIGGER_KINDS)}
                 for e in exc.errors()]
        inner = {tuple(e["loc"][:n]) for e in found for n in range(1, len(e["loc"]))}
        # an invalid item is not also reported as "none" (too_short) for its list
        errors = [format_error(err, path, marks, _keys_at) for err in found
                  if not (err["type"] == "too_short" and tuple(err["loc"]) in inner)]
        raise ManifestError("; ".join(errors), path, errors) from exc


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping may hold at this place of plugin.yaml."""
    names = [p for p in loc if isinstance(p, str)]
    if tuple(names) == ("triggers",):
        return [*Trigger.model_fields, *Schedule.model_fields]
    model: Any = {(): Manifest, ("resources",): Resources, ("permissions",): Permissions,
                  ("permissions", "fs"): FsPermissions,
                  ("permissions", "net"): NetPermissions}.get(tuple(names))
    return list(model.model_fields) if model else []



def load_manifest(plugin_dir: Path, max_bytes: int = 64 * 1024,
                  expected_name: str | None = None) -> Manifest:
    """Reads and validates `plugin_dir/plugin.yaml` (for trusted, local directories such as
    benchmarks; the registry reads plugins through `manager.plugins.safefs`)."""
    path = plugin_dir / MANIFEST_NAME
    try:
        with path.open("rb") as fh:
            text = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}", str(path),
                            [f"file: {exc.strerror}"]) from exc
    files = {str(p.relative_to(plugin_dir)) for p in plugin_dir.rglob("*") if p.is_file()}
    return manifest_from_files(text, files, str(path), expected_name or plugin_dir.name,
                               max_bytes)


def manifest_from_files(text: bytes, files: set[str], where: str, expected_name: str,
                        max_bytes: int) -> Manifest:
    """Validates plugin.yaml and checks its entrypoint against the plugin's own files."""
    manifest = parse_manifest(text, where, max_bytes)
    errors = []
    if manifest.name != expected_name:
        errors.append(f"name: {manifest.name!r} must equal the directory name {expected_name!r}")
    program = manifest.argv[0]
    script = next((a for a in manifest.argv[1:] if not a.startswith("-")), None)
    for arg in (program, script):
        if arg and not arg.startswith("/") and ("/" in arg or arg.endswith((".py", ".sh"))):
            rel = str(PurePosixPath(arg))
            if rel not in files:
                errors.append(f"entrypoint: {arg!r} does not exist in the plugin directory")
    if errors:
        raise ManifestError(f"{where}: " + "; ".join(errors), where, errors)
    return manifest
