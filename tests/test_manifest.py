"""Unit tests: plugin.yaml validation and plugin discovery (SPEC §3, §4)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from manager.core.config import Settings
from manager.core.errors import ManifestError
from manager.plugins.discovery import discover
from manager.plugins.loader import PluginEntry, PluginStatus, load_plugin
from manager.plugins.manifest import parse_manifest

GOOD = """\
name: demo
version: 0.1.0
triggers:
  - topic: chat.v1
    event_type: user_message
entrypoint: python main.py
image: titan-runtime:py3.11
resources: {cpu: "100m", memory: "256Mi"}
permissions: {fs: {allow: ["/srv/titan/data/**"]}}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text.encode(), "plugin.yaml", 64 * 1024)
    return info.value.errors


def test_good_manifest() -> None:
    m = parse_manifest(GOOD.encode(), "plugin.yaml", 64 * 1024)
    assert m.name == "demo" and m.argv == ("python", "main.py")
    assert m.cpu_millis == 100 and m.memory_bytes == 256 * 1024**2 and m.timeout == 30


@pytest.mark.parametrize("key", ["privileged: true", "cap_add: [SYS_ADMIN]", "devices: [/dev/sda]",
                                 "network: host", "user: root", "volumes: [/:/host]",
                                 "timeuot: 5"])
def test_unknown_keys_are_rejected(key: str) -> None:
    assert any("unknown key" in e for e in errors_of(GOOD + key + "\n"))


@pytest.mark.parametrize("glob", ["/", "/**", "/etc/**", "/proc", "/var/run/docker.sock",
                                  "relative/**", "/srv/../etc/**", "/usr/lib/*", "/sys/*"])
def test_dangerous_globs_are_rejected(glob: str) -> None:
    errs = errors_of(GOOD.replace("/srv/titan/data/**", glob))
    assert any("permissions.fs.allow" in e for e in errs), errs


@pytest.mark.parametrize(("old", "new", "field"), [
    ("name: demo", "name: Demo/x", "name"), ("name: demo", "name: ../x", "name"),
    ("version: 0.1.0", "version: one", "version"), ('cpu: "100m"', 'cpu: "lots"', "cpu"),
    ('memory: "256Mi"', 'memory: "1 TB"', "memory"),
    ("entrypoint: python main.py", "entrypoint: python ../evil.py", "entrypoint"),
    ("entrypoint: python main.py", "entrypoint: python /etc/x.py", "entrypoint"),
    ("entrypoint: python main.py", "entrypoint: 'python \"main.py'", "entrypoint"),
])
def test_bad_values_name_their_field(old: str, new: str, field: str) -> None:
    assert any(field in e for e in errors_of(GOOD.replace(old, new)))


def test_strict_types_no_silent_coercion() -> None:
    assert any("timeout: must be a whole number" in e for e in errors_of(GOOD + 'timeout: "30"\n'))


def test_unsafe_yaml_is_refused() -> None:
    assert "constructor" in errors_of(GOOD + "x: !!python/object/apply:os.system [id]\n")[0]
    laughs = 'a: &a ["x","x"]\nb: &b [*a,*a]\nc: &c [*b,*b]\n'
    assert "aliases are not allowed" in errors_of(laughs)[0]
    with pytest.raises(ManifestError, match="over"):
        parse_manifest(b"#" * (10 * 1024 * 1024), "plugin.yaml", 64 * 1024)


def _plugin(root: Path, name: str, text: str, code: str = "print()") -> Path:
    d = root / name
    d.mkdir()
    (d / "plugin.yaml").write_text(text)
    (d / "main.py").write_text(code)
    return d


def test_discover_lists_invalid_plugins_and_loads_the_others(tmp_path: Path) -> None:
    settings = Settings.from_env(max_timeout=60)
    _plugin(tmp_path, "demo", GOOD)
    _plugin(tmp_path, "broken", GOOD.replace("name: demo", "name: broken") + "privileged: true\n")
    _plugin(tmp_path, "greedy", GOOD.replace("name: demo", "name: greedy") + "timeout: 3600\n")
    _plugin(tmp_path, "misnamed", GOOD)
    (tmp_path / "nomain").mkdir()
    (tmp_path / "nomain" / "plugin.yaml").write_text(GOOD.replace("name: demo", "name: nomain"))
    _plugin(tmp_path, "huge", "# " + "x" * (10 * 1024 * 1024))
    _plugin(tmp_path, "pickled", "!!python/object/apply:os.system ['touch /tmp/pwned']\n")
    _plugin(tmp_path, "laughs", 'a: &a ["x","x"]\nb: &b [*a,*a]\n')
    _plugin(tmp_path, "escape", GOOD.replace("name: demo", "name: escape").replace(
        "python main.py", "python ../demo/main.py"))
    _plugin(tmp_path, "dotted", GOOD.replace("name: demo", "name: ../demo"))
    (tmp_path / "Bad-Name").mkdir()
    found = {name: entry for name, (entry, _) in discover(tmp_path, settings.plugin).found.items()}
    assert found["demo"].runnable
    for name in ("huge", "pickled", "laughs", "escape", "dotted", "Bad-Name"):
        assert not found[name].runnable and found[name].errors, name
    assert "larger than" in found["huge"].errors[0]
    assert not Path("/tmp/pwned").exists()
    assert found["demo"].status is PluginStatus.LOADED and found["demo"].digest
    assert any(e.endswith("plugin.yaml:10:1: privileged: unknown key (not allowed)")
               for e in found["broken"].errors), found["broken"].errors
    assert any("above the maximum" in e for e in found["greedy"].errors)
    assert any("must equal the directory name" in e for e in found["misnamed"].errors)
    assert any("does not exist" in e for e in found["nomain"].errors)


def _digest(d: Path) -> str | None:
    entry, _ = load_plugin(d, Settings.from_env().plugin)
    return entry.digest


def test_digest_follows_content_and_refuses_symlinks(tmp_path: Path) -> None:
    d = _plugin(tmp_path, "demo", GOOD)
    first = _digest(d)
    assert first and _digest(d) == first
    (d / "main.py").write_text("print('changed')")
    assert _digest(d) not in (None, first)
    (d / "link").symlink_to("/etc/passwd")
    entry, bundle = load_plugin(d, Settings.from_env().plugin)
    assert not entry.runnable and bundle is None
    assert entry.errors == ("files: link: is a symlink; plugins may not contain symlinks",)


def test_duplicate_keys_are_refused() -> None:
    errs = errors_of(GOOD + "timeout: 5\ntimeout: 600\n")
    assert any("duplicate key 'timeout'" in e for e in errs), errs


def _load_with_glob(tmp_path: Path, glob: str, settings: Settings) -> PluginEntry:
    d = tmp_path / "plugins" / "demo"
    shutil.rmtree(d, ignore_errors=True)
    d.parent.mkdir(exist_ok=True)
    _plugin(d.parent, "demo", GOOD.replace("/srv/titan/data/**", glob))
    return load_plugin(d, settings.plugin)[0]


@pytest.mark.parametrize("glob", ["/work/**", "/var/**", "/home/**", "/tmp/**", "/opt/**",
                                  "/var/lib/dock[e]r/**", "/srv/**", "RUN_DIR/**",
                                  "CACHE_DIR/x/**"])
def test_globs_outside_the_allowed_roots_are_rejected_at_load(tmp_path: Path, glob: str) -> None:
    run_dir = Path("/srv/titan/run-" + tmp_path.name)
    settings = Settings.from_env(allowed_roots=(Path("/srv/titan"),), run_dir=run_dir,
                                 cache_dir=run_dir / "cache")
    glob = glob.replace("RUN_DIR", str(run_dir)).replace("CACHE_DIR", str(run_dir / "cache"))
    entry = _load_with_glob(tmp_path, glob, settings)
    assert not entry.runnable
    assert any(("outside the allowed roots (/srv/titan" in e or "never granted" in e)
               and "permissions.fs.allow" in e for e in entry.errors), entry.errors


def test_a_glob_inside_the_roots_loads(tmp_path: Path) -> None:
    settings = Settings.from_env(allowed_roots=(tmp_path / "data",))
    (tmp_path / "data" / "in").mkdir(parents=True)
    assert _load_with_glob(tmp_path, f"{tmp_path}/data/in/**", settings).runnable


def test_a_glob_whose_base_is_a_symlink_into_etc_is_rejected_at_load(tmp_path: Path) -> None:
    settings = Settings.from_env(allowed_roots=(tmp_path / "data",))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link").symlink_to("/etc")
    entry = _load_with_glob(tmp_path, f"{tmp_path}/data/link/**", settings)
    assert not entry.runnable
    assert any("resolves to /etc" in e for e in entry.errors), entry.errors


def test_errors_name_the_place_say_it_plainly_and_suggest_the_key() -> None:
    errs = errors_of(GOOD.replace('version: 0.1.0', 'version: one') + "timeuot: 5\n"
                     'timeout: "30"\n')
    assert "plugin.yaml:2:1: version: must be a semantic version such as 1.0.0, got 'one'" \
        in errs
    assert "plugin.yaml:10:1: timeuot: unknown key (not allowed) (did you mean 'timeout'?)" \
        in errs
    assert "plugin.yaml:11:1: timeout: must be a whole number, without quotes" in errs
    nested = errors_of(GOOD.replace("event_type: user_message", "event_typ: user_message"))
    assert any("triggers.0.event_typ: unknown key (not allowed) (did you mean 'event_type'?)"
               in e for e in nested)
    assert not any("needs at least one" in e for e in nested)


def test_a_yaml_syntax_error_names_the_file_line_and_column() -> None:
    errs = errors_of(GOOD + "retries: [1\nx: 2\n")  # a list never closed
    assert len(errs) == 1 and "<byte string>" not in errs[0], errs
    assert re.search(r"plugin\.yaml:\d+:\d+: yaml: ", errs[0]), errs


@pytest.mark.parametrize(("old", "new", "said"), [
    ("topic: chat.v1", "topic: chat.[v1", "never closed"),
    ("event_type: user_message", "event_type: user_[]m", "never closed"),
    ("topic: chat.v1", "topic: chat.v1]", "no '['"),
    ("/srv/titan/data/**", "/srv/titan/data/[ab/*", "never closed"),
])
def test_a_character_class_that_does_not_close_is_refused(old: str, new: str, said: str
                                                          ) -> None:
    errs = errors_of(GOOD.replace(old, new))
    assert any(said in e for e in errs), errs


@pytest.mark.parametrize("pattern", ["chat.[v]1", "chat.v[0-9]", "chat.[]]", "c*.[a-c]?"])
def test_closed_character_classes_load(pattern: str) -> None:
    m = parse_manifest(GOOD.replace("topic: chat.v1", f'topic: "{pattern}"').encode(),
                       "plugin.yaml", 64 * 1024)
    assert m.triggers[0].topic == pattern


@pytest.mark.parametrize(("old", "new", "hint"), [
    ("  - topic: chat.v1", "\t- topic: chat.v1", "indent with spaces"),
    ("version: 0.1.0", "version: 0.1.0\ndescription: a: b", "needs quotes"),
    ('["/srv/titan/data/**"]}}', '["/srv/titan/data/**"}}', "closing ']'"),
    ("entrypoint: python main.py", "entrypoint python main.py", "key: value"),
])
def test_a_yaml_slip_gets_a_hint(old: str, new: str, hint: str) -> None:
    (error,) = errors_of(GOOD.replace(old, new))
    assert error.startswith("plugin.yaml:") and "; hint: " in error and hint in error, error
