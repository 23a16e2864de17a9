"""A plugin author's first ten minutes: `new`, `run`, absent images, the seed's
`python test_plugin_manager.py`, and /docs with a token set. The CLI runs as a user would
run it, with the system's python3 (it finds the project's virtualenv by itself)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import WorkerProcess, new_id, record_of, wait_until, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.core.config import ROOT
from manager.core.contract import make_celery
from manager.core.events import Event
from manager.plugins.registry import Registry

pytestmark = pytest.mark.integration
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"
ABSENT_IMAGE = "python:3.12-slim"


def cli(settings, *args: str, stdin: str | None = None, script: str = "titan-plugins.py",
        **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TITAN_")}
    full_env.update(TITAN_CACHE_DIR=str(settings.cache_dir), TITAN_INSTANCE=settings.instance,
                    TITAN_WORKER_NAME=settings.worker_name, **env)
    return subprocess.run([SYSTEM_PYTHON, str(ROOT / script), *args], env=full_env,
                          input=stdin, capture_output=True, text=True, timeout=180, check=False)


def write(d: Path, name: str, code: str, extra: str = "", image: str = "titan-runtime:py3.11"
          ) -> Path:
    target = d / name
    target.mkdir(parents=True)
    (target / "plugin.yaml").write_text(
        f"name: {name}\nversion: 1.0.0\ntriggers: [{{topic: author.v1, event_type: {name}}}]\n"
        f"entrypoint: python main.py\nimage: {image}\n{extra}")
    (target / "main.py").write_text(code)
    return target


EVENT = json.dumps({"event_id": "a-1", "topic": "author.v1", "event_type": "x",
                    "payload": {"n": 1}})


def test_new_scaffolds_a_plugin_that_validates_and_runs(settings, tmp_path) -> None:
    made = cli(settings, "new", "greeter", "--topic", "chat.v1", "--event-type",
               "user_message", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    assert ": draft" in made.stdout and "titan-plugins.py run" in made.stdout
    assert "delete the line `draft: true`" in made.stdout
    d = tmp_path / "greeter"
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "event.json", "main.py",
                                                  "plugin.yaml"]
    ran = cli(settings, "--json", "run", str(d), "-e", f"@{d}/event.json")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads(ran.stdout)
    assert report["status"] == "succeeded" and report["exit_code"] == 0
    (result,) = report["results"]
    assert result["topic"] == "chat.v1" and result["event_type"] == "user_message_handled"
    assert result["payload"] == {"received": {"text": "hello from the sample event"}}
    manifest = (d / "plugin.yaml").read_text()
    from manager.plugins.manifest import Manifest

    missing = [k for k in Manifest.model_fields
               if not re.search(rf"^(# )?{k}:", manifest, re.M)]
    assert missing == [], f"the scaffold says every key is there but lacks {missing}"
    # the sample has no event_id: the CLI gives each use a fresh one (never a duplicate)
    assert "event_id" not in json.loads((d / "event.json").read_text())
    assert "greeter handling cli-" in report["stderr"]
    again = cli(settings, "new", "greeter", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    newline = cli(settings, "new", "x\n", "--dir", str(tmp_path))
    assert newline.returncode == 2 and "not a valid plugin name" in newline.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["greeter"]


def test_new_writes_a_timer_plugin_and_shows_every_timer_key(settings, tmp_path) -> None:
    """`new --every` / `--schedule` make a plugin on a clock that validates (its sample a
    tick); the event scaffold shows every timer key, commented; deleting `draft: true`
    leaves nothing about drafts behind; a bad clock is refused before anything is made."""
    from manager.plugins.schedule import Schedule

    for name, clock, line in (("ticker", ["--every", "5m"], "  - every: 5m "),
                              ("daily", ["--schedule", "0 9 * * *"],
                               '  - schedule: "0 9 * * *" ')):
        made = cli(settings, "new", name, *clock, "--dir", str(tmp_path))
        assert made.returncode == 0, made.stdout + made.stderr
        manifest = (tmp_path / name / "plugin.yaml").read_text()
        assert line in manifest
        assert json.loads((tmp_path / name / "event.json").read_text())["topic"] == "timer.v1"
        (tmp_path / name / "plugin.yaml").write_text(
            "".join(ln for ln in manifest.splitlines(keepends=True)
                    if not ln.startswith("draft: true")))
        assert "draft" not in (tmp_path / name / "plugin.yaml").read_text()
        checked = cli(settings, "validate", str(tmp_path / name))
        assert checked.returncode == 0 and f"{name}: loaded" in checked.stdout, checked.stdout
    events = cli(settings, "new", "greeter", "--dir", str(tmp_path))
    assert events.returncode == 0
    manifest = (tmp_path / "greeter" / "plugin.yaml").read_text()
    missing = [k for k in Schedule.model_fields if not re.search(rf"^  #( -|  ) {k}:",
                                                                 manifest, re.M)]
    assert missing == [], manifest
    both = cli(settings, "new", "x", "--every", "5m", "--schedule", "@daily",
               "--dir", str(tmp_path))
    huge = cli(settings, "new", "y", "--every", "99999999999d", "--dir", str(tmp_path))
    assert both.returncode == 2 and "choose one" in both.stderr
    assert huge.returncode == 2 and "longer than 366d" in huge.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daily", "greeter", "ticker"]


def test_a_draft_stays_out_of_service_until_its_author_deletes_the_line(
        settings, conn, tmp_path) -> None:
    """`new` makes a draft: no reload (the watcher's, anyone's) puts it in service, no
    event runs it, a trigger says why; deleting `draft: true` is the author's word."""
    from manager.bus.matching import match
    from manager.cli.text import plugin_table, reload_text
    from manager.plugins.scaffold import scaffold

    mine = settings.with_(plugins_dir=tmp_path, key_prefix=f"{settings.key_prefix}{new_id()}")
    d = scaffold(tmp_path, "greeter", "chat.v1", "user_message", mine)
    registry = Registry(wired(conn, mine))
    client = create_app(wired(conn, mine), registry, Dispatcher(
        wired(conn, mine), make_celery(mine.broker))).test_client()
    event = Event(new_id(), "chat.v1", "user_message")
    first = registry.reload()
    assert first["added"] == [] and [x["name"] for x in first["drafts"]] == ["greeter"]
    assert "draft: greeter 0.1.0" in reload_text(first) and "serving nothing" in reload_text(first)
    assert registry.get("greeter").status == "draft"
    assert match(event, registry.entries().values()) == []
    listed = client.get("/plugins").json
    assert "DRAFT" in plugin_table(listed).splitlines()[1]
    refused = client.post("/plugins/greeter/trigger", json=event.to_dict())
    assert refused.status_code == 409, refused.json
    assert "is a draft" in refused.json["error"]["message"]
    assert f"`draft: true` is deleted from {d}/plugin.yaml" in refused.json["error"]["message"]
    manifest = (d / "plugin.yaml").read_text()
    (d / "plugin.yaml").write_text(re.sub(r"(?m)^draft: true.*\n", "", manifest))
    ready = registry.reload()
    assert [x["name"] for x in ready["added"]] == ["greeter"] and ready["drafts"] == []
    assert [e.name for e in match(event, registry.entries().values())] == ["greeter"]
    # a draft of the next version leaves the one in service serving, and says so
    (d / "plugin.yaml").write_text(manifest.replace("version: 0.1.0", "version: 0.2.0"))
    edited = registry.reload()
    assert edited["drafts"][0]["serving"]["version"] == "0.1.0" and edited["updated"] == []
    serving = registry.get("greeter")
    assert (serving.status, serving.version, serving.draft) == ("loaded", "0.1.0", "0.2.0")
    assert "loaded, DRAFT 0.2.0 waits" in plugin_table(client.get("/plugins").json)


def test_new_never_writes_through_a_planted_symlink(settings, tmp_path) -> None:
    """`new --dir` in a directory another user can write: a symlink planted between the
    directory's creation and the files' never gets written through."""
    from manager.plugins.scaffold import scaffold

    victim = tmp_path / "victim.txt"
    victim.write_text("root's own file")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    stop = threading.Event()
    refused = 0

    def plant(target: Path) -> None:
        while not stop.is_set():
            for name in ("plugin.yaml", "main.py", "README.md", "event.json"):
                with contextlib.suppress(OSError):
                    (target / name).symlink_to(victim)

    for n in range(400):  # until the planter has won a few races (sooner on an idle machine)
        if refused >= 3:
            break
        target = shared / f"raced{n}"
        stop.clear()
        planter = threading.Thread(target=plant, args=(target,))
        planter.start()
        try:
            scaffold(shared, f"raced{n}", "a.v1", "b", settings)
        except ValueError as exc:
            assert "appeared while" in str(exc), exc
            refused += 1
        finally:
            stop.set()
            planter.join()
        assert victim.read_text() == "root's own file", f"written through a symlink in {n}"
    assert refused > 0, "the planter never won a race: the test proved nothing"


@pytest.mark.parametrize(("code", "extra", "status", "says"), [
    ("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n", "", "failed",
     "exited with code 3: boom"),
    ("print('hello, not json')\n", "", "failed", "invalid output: stdout line 1 is not JSON"),
    ("import time\ntime.sleep(30)\n", "timeout: 1\n", "timeout", "timed out after 1s"),
])
def test_run_reports_failures_and_exits_non_zero(settings, tmp_path, code: str, extra: str,
                                                  status: str, says: str) -> None:
    d = write(tmp_path, "breaks", code, extra)
    text = cli(settings, "run", str(d), "-e", EVENT)
    assert text.returncode == 1 and f"status {status}" in text.stdout and says in text.stdout
    as_json = cli(settings, "--json", "run", str(d), "-e", "@-", stdin=EVENT)
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and report["status"] == status and says in report["reason"]


def test_run_refuses_an_invalid_plugin_and_a_bad_event(settings, tmp_path) -> None:
    d = write(tmp_path, "typo", "print()\n", "timeuot: 5\n")
    out = cli(settings, "run", str(d), "-e", EVENT)
    assert out.returncode == 1 and "timeuot: unknown key" in out.stderr
    d = write(tmp_path, "fine", "print()\n")
    out = cli(settings, "run", str(d), "-e", '{"event_id": "x"}')
    assert out.returncode == 2 and "topic is required" in out.stderr


def test_an_absent_image_is_a_load_warning_and_a_fast_clear_failure(settings, conn,
                                                                     tmp_path) -> None:
    plugins = tmp_path / "plugins"
    write(plugins, "slim", "print()\n", image=ABSENT_IMAGE)
    uid = new_id("img")
    mine = settings.with_(plugins_dir=plugins, key_prefix=f"{settings.key_prefix}{uid}",
                          task_queue=f"{settings.task_queue}.{uid}",
                          event_stream=f"{settings.event_stream}.{uid}")
    worker = WorkerProcess(mine, "images", concurrency=1)
    try:
        worker.wait_ready(conn)
        registry = Registry(wired(conn, mine))
        wait_until(lambda: registry.worker_engines().images, 30, "the worker to report its images")
        answer = registry.reload()
        assert [a["name"] for a in answer["added"]] == ["slim"]  # still loads: hosts differ
        (warned,) = answer["warnings"]
        assert ABSENT_IMAGE in warned["warnings"][0]
        assert "titan-runtime:py3.11" in warned["warnings"][0]
        assert registry.get("slim").warnings == tuple(warned["warnings"])
        t0 = time.monotonic()
        inv, _ = Dispatcher(wired(conn, mine), make_celery(mine.broker)).dispatch(
            Event(new_id(), "author.v1", "slim"), registry.get("slim"), "api")
        done = wait_until(lambda: (r := record_of(conn, mine, inv))["status"] not in (
            "pending", "queued", "running", "retrying") and r, 60, "the run to fail")
        assert time.monotonic() - t0 < 30
    finally:
        worker.stop()
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert ABSENT_IMAGE in done["reason"] and "image: titan-runtime:py3.11" in done["reason"]
    local = cli(settings, "run", str(plugins / "slim"), "-e", EVENT)
    assert local.returncode == 1 and ABSENT_IMAGE in local.stdout


def test_test_plugin_manager_checks_discovery(settings, tmp_path) -> None:
    builtins = tmp_path / "builtins"  # the shipped ones, whatever a user added to plugins/
    for name in ("file_watcher", "shell_runner"):
        shutil.copytree(ROOT / "plugins" / name, builtins / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    ok = cli(settings, script="test_plugin_manager.py", TITAN_PLUGINS_DIR=str(builtins))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [ln.split(":")[0] for ln in ok.stdout.splitlines() if not ln.startswith(" ")] == [
        "file_watcher", "shell_runner"]
    write(tmp_path, "good", "print()\n")
    write(tmp_path, "broken", "print()\n", "privileged: true\n")
    bad = cli(settings, script="test_plugin_manager.py", TITAN_PLUGINS_DIR=str(tmp_path))
    assert bad.returncode == 1
    assert "broken: invalid" in bad.stdout and "privileged: unknown key" in bad.stdout
    assert "good: loaded" in bad.stdout


def test_docs_load_without_the_token_while_the_api_needs_it(settings, conn, registry,
                                                            dispatcher) -> None:
    client = create_app(wired(conn, settings.with_(api_token="s3cret")), registry,
                        dispatcher).test_client()
    for path in ("/docs", "/openapi.json", "/docs/static/swagger-ui-bundle.js", "/health"):
        assert client.get(path).status_code in (200, 503), path
    assert client.get("/openapi.json").json["components"]["securitySchemes"]["bearer"]
    assert client.get("/plugins").status_code == 401
    authed = client.get("/plugins", headers={"Authorization": "Bearer s3cret"})
    assert authed.status_code == 200


def test_triggering_an_invalid_plugin_says_why(settings, conn, tmp_path) -> None:
    plugins = tmp_path / "plugins"
    write(plugins, "broken", "print()\n", "privileged: true\n")
    uid = new_id("inv")
    mine = settings.with_(plugins_dir=plugins, key_prefix=f"{settings.key_prefix}{uid}",
                          task_queue=f"{settings.task_queue}.{uid}")
    registry = Registry(wired(conn, mine))
    registry.reload()
    app = create_app(wired(conn, mine), registry, Dispatcher(wired(conn, mine),
                                                             make_celery(mine.broker)))
    app.config["TESTING"] = True
    answer = app.test_client().post(
        "/plugins/broken/trigger",
        json={"event_id": new_id(), "topic": "author.v1", "event_type": "broken"})
    assert answer.status_code == 409, answer.json
    message = answer.json["error"]["message"]
    assert message.startswith("plugin 'broken' is invalid: ") and "privileged" in message
