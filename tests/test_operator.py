"""The operator's surface tells the truth: the CLI from the system's python3, JSON that
parses on every command, distinct exit codes, logs with the plugin's stderr, dead letters
that can be listed and replayed, bounded query parameters, and Flower's view of runs."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from harness import SYSTEM_PYTHON, Bus, new_id, run_cli, wait_until, wired
from manager.core.config import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


def event(**extra: object) -> str:
    return json.dumps({"event_id": new_id(), "topic": "t", "event_type": "e", **extra})


@contextlib.contextmanager
def http_server(body: bytes) -> Iterator[str]:
    """Something that answers HTTP, but is not the Titan API."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_the_cli_runs_with_the_system_python(api_url: str) -> None:
    listed = run_cli(api_url, "list")  # with /usr/bin/python3, which has no click
    assert listed.returncode == 0 and "shell_runner" in listed.stdout, listed.stderr


def test_json_on_every_command_parses(api_url: str, bus: Bus, conn, settings) -> None:
    ran = run_cli(api_url, "trigger", "echo", "-e", event(), "--wait", "--json")  # after
    record = json.loads(ran.stdout)
    assert ran.returncode == 0 and record["status"] == "succeeded"
    for args in (["list"], ["health"], ["show", record["invocation_id"]], ["logs", "echo"],
                 ["dead", "-n", "3"], ["publish", "-e", event()], ["reload"],
                 ["versions", "echo"]):
        for where in ("before", "after"):
            argv = ["--json", *args] if where == "before" else [*args, "--json"]
            done = run_cli(api_url, *argv)
            assert done.returncode == 0, (argv, done.stderr)
            json.loads(done.stdout)
    kept = run_cli(api_url, "versions", "echo")
    assert kept.returncode == 0 and re.search(r"^\*\s+0\.1\.0\s+\w{12}\s", kept.stdout,
                                              re.MULTILINE), kept.stdout
    missing = run_cli(api_url, "--json", "show", "no-such-run")
    assert missing.returncode == 3  # not found
    assert json.loads(missing.stdout)["error"]["code"] == "invocation_not_found"


def test_exit_codes(api_url: str) -> None:
    ok = run_cli(api_url, "trigger", "echo", "-e", event(), "--wait")
    failed = run_cli(api_url, "trigger", "failing", "-e", event(), "--wait")
    slow = run_cli(api_url, "trigger", "sleeper", "-e", event(payload={"seconds": 4}),
                   "--wait", "0.3")
    usage = run_cli(api_url, "trigger", "echo")
    down = run_cli("127.0.0.1:1", "--json", "list")  # no scheme: http is assumed
    typo = run_cli(api_url, "publish", "--wait", "30", "-e", json.dumps(
        {"topic": "tset.v1", "event_type": "ping"}))
    assert [ok.returncode, failed.returncode, slow.returncode, usage.returncode,
            down.returncode, typo.returncode] == [0, 1, 5, 2, 4, 6], typo
    assert "nearest trigger: test.v1/ping of echo (2 edits away)" in typo.stdout
    assert "status failed" in failed.stdout
    # stdout and stderr tell one story: the status the run has when the wait ran out
    said = re.match(r"(\w+): invocation ", slow.stdout)
    assert said and f" is {said.group(1)} " in slow.stderr, (slow.stdout, slow.stderr)
    # a wait that runs out says so, where the run stands, and how to follow it
    inv = slow.stdout.split("invocation ")[1].split()[0]
    assert "the wait ran out after 0.3s: run " + inv + " of sleeper is " in slow.stderr, slow
    assert re.search(r"is (queued for [\d.]+s, behind \d+ unstarted run\(s\), with \d+ "
                     r"running|running \(it waited [\d.]+s before it started\))", slow.stderr)
    assert f"show {inv}" in slow.stderr and "logs -f sleeper" in slow.stderr
    assert re.search(r"queued_s: [\d.]+\n  duration_s: ", ok.stdout), ok.stdout
    assert json.loads(down.stdout)["error"]["code"] == "unreachable"
    for body in (b"<html>a web page</html>", b'{"plugins_count": 3}'):  # JSON, not ours
        with http_server(body) as url:
            other = run_cli(url, "list")
        assert other.returncode == 1, other.stderr
        assert f"not a Titan API at {url}" in other.stderr and "Traceback" not in other.stderr


def test_a_wait_on_a_terminal_shows_where_the_run_stands(api_url: str) -> None:
    """On a terminal, `trigger --wait` redraws one line on stderr while it waits (queued:
    how long and how many ahead; then running: on which worker), and clears it before the
    record is printed; through a pipe (every other test here) it prints no progress."""
    import pty

    main, side = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TITAN_")}
    proc = subprocess.Popen([SYSTEM_PYTHON, str(ROOT / "titan-plugins.py"), "trigger",
                             "sleeper", "-e", event(payload={"seconds": 3}), "--wait", "60"],
                            stdout=subprocess.PIPE, stderr=side, text=True,
                            env={**env, "TITAN_API_URL": api_url})
    os.close(side)
    seen = b""
    with contextlib.suppress(OSError):  # EIO once the CLI has exited and closed it
        while chunk := os.read(main, 4096):
            seen += chunk
    os.close(main)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "status succeeded" in out, (out, seen)
    shown = seen.decode()
    assert "\r\x1b[Ksleeper: running on " in shown, shown
    assert shown.endswith("\r\x1b[K"), shown  # cleared before the record


def test_a_misspelled_plugin_gets_the_nearest_names_and_exit_code_3(
        api_url: str, plugins_dir) -> None:
    for args in (["trigger", "ech", "-e", event()], ["logs", "ech"], ["rollback", "ech"]):
        done = run_cli(api_url, *args)
        assert done.returncode == 3, (args, done.stdout, done.stderr)
        assert "no plugin named 'ech' (did you mean: echo?)" in done.stderr, done.stderr
    found = run_cli(api_url, "--json", "trigger", "ech", "-e", event())
    assert json.loads(found.stdout)["error"]["details"]["suggestions"] == ["echo"]
    local = run_cli(api_url, "validate", "ech", TITAN_PLUGINS_DIR=str(plugins_dir))
    assert local.returncode == 3 and "did you mean: echo" in local.stderr, local.stderr
    named = run_cli(api_url, "validate", "echo", TITAN_PLUGINS_DIR=str(plugins_dir))
    assert named.returncode == 0 and "echo" in named.stdout, named.stderr


def test_publish_wait_shows_the_runs_and_names_a_duplicate(api_url: str) -> None:
    sample = json.dumps({"event_id": new_id(), "topic": "test.v1", "event_type": "ping"})
    first = run_cli(api_url, "publish", "-e", sample, "--wait")
    assert first.returncode == 0, first.stderr
    ran = re.search(r"echo: succeeded  (\w+)", first.stdout)
    assert ran and "-> test.v1/pong" in first.stdout, first.stdout
    again = run_cli(api_url, "publish", "-e", sample, "--wait")
    assert again.returncode == 0, again.stderr
    assert f"echo: duplicate of run {ran.group(1)}" in again.stdout, again.stdout
    assert "publish without an event_id, or with a new one" in again.stdout
    dead = run_cli(api_url, "publish", "-e", json.dumps(
        {"topic": "test.v1", "event_type": "ping", "hops": 999}), "--wait")
    assert dead.returncode == 1 and "dead-lettered: hops_exceeded" in dead.stdout, dead.stdout


def test_logs_show_each_runs_stderr_under_its_status(api_url: str) -> None:
    run_cli(api_url, "trigger", "failing", "-e", event(), "--wait")
    logs = run_cli(api_url, "logs", "failing", "-n", "1")
    status, *log_lines = logs.stdout.splitlines()
    assert "  0.1.0  failed " in status and "exited with code 3" in status
    assert log_lines == ["  about to fail", "  database is on fire"]


def test_logs_follow_prints_the_last_n_then_each_new_run_once_in_order(api_url: str) -> None:
    older = [json.loads(run_cli(api_url, "--json", "trigger", "echo", "--wait", "-e",
                                event()).stdout)["invocation_id"] for _ in range(2)]
    follower = subprocess.Popen([SYSTEM_PYTHON, str(ROOT / "titan-plugins.py"), "--api",
                                 api_url, "--json", "logs", "echo", "-f", "-n", "1"],
                                stdout=subprocess.PIPE, text=True)
    printed: list[dict] = []
    reader = threading.Thread(target=lambda: [printed.append(json.loads(line))
                                              for line in follower.stdout],  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        # ready once it printed the run that was already there (the newest, -n 1)
        wait_until(lambda: printed, 30, "logs -f to start")
        invs = [json.loads(run_cli(api_url, "--json", "trigger", "echo", "-e", event()).stdout)
                ["invocation_id"] for _ in range(10)]
        wait_until(lambda: {r["invocation_id"] for r in printed} >= set(invs), 90,
                   "logs -f to show all 10 runs")
    finally:
        follower.kill()
    ids = [r["invocation_id"] for r in printed]
    assert ids[0] == older[-1] and older[0] not in ids, ids  # the last 1, nothing older
    assert sorted(ids[1:]) == sorted(invs) and len(ids) == 11, ids  # each new run once
    assert all(r["status"] == "succeeded" for r in printed[1:]), printed  # once finished


def test_dead_letters_are_listed_and_replayed(api_url: str, client, conn, settings,
                                              bus: Bus) -> None:
    broken = {"event_id": new_id("dead"), "topic": "test.v1"}
    bus.publish(broken)
    listed = run_cli(api_url, "--json", "dead", "-n", "50")
    dead = next(d for d in json.loads(listed.stdout)["dead"] if d["event"] == broken)
    assert dead["reason"] == "missing_field" and "event_type is required" in dead["detail"]
    still_bad = run_cli(api_url, "dead", "replay", dead["id"])
    assert still_bad.returncode == 1 and "event_type is required" in still_bad.stderr
    assert "can never be replayed as it is" in still_bad.stderr  # and what to do instead
    assert "publish it instead" in still_bad.stderr
    fixed = {"event_id": new_id("fixed"), "topic": "test.v1", "event_type": "ping"}
    entry = conn.xadd(settings.dead_stream, {"event": json.dumps(fixed), "reason":
                                             "unprocessable", "detail": "a fixed bug"}).decode()
    replayed = run_cli(api_url, "dead", "replay", entry)
    assert replayed.returncode == 0 and fixed["event_id"] in replayed.stdout
    assert bus.result_of(fixed["event_id"])["event_type"] == "pong"
    assert client.post("/events/dead/0-1/replay").status_code == 404


@pytest.mark.parametrize("query", ["wait=nan", "wait=abc", "wait=-1", "wait=601",
                                   "wait=inf"])
def test_bad_wait_is_a_400_naming_the_field(client, query: str) -> None:
    resp = client.post(f"/plugins/echo/trigger?{query}", json=json.loads(event()))
    assert resp.status_code == 400 and resp.json["error"]["details"]["field"] == "wait"


@pytest.mark.parametrize("query", ["limit=abc", "limit=0", "limit=100000"])
def test_bad_limit_is_a_400_naming_the_field(client, query: str) -> None:
    resp = client.get(f"/plugins/echo/invocations?{query}")
    assert resp.status_code == 400 and resp.json["error"]["details"]["field"] == "limit"


@pytest.mark.parametrize(("body", "field"), [(b'"1.0.0"', "body"), (b"not json", "body"),
                                             (b'{"version": 5}', "version"),
                                             (b'{"versoin": "1.0.0"}', "body")])
def test_rollback_refuses_bodies_it_cannot_mean(client, body: bytes, field: str) -> None:
    resp = client.post("/plugins/echo/rollback", data=body)
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["details"]["field"] == field


def test_flower_sees_failures_as_failures_under_the_plugin_name(settings, app, client) -> None:
    from celery.events.state import State

    from manager.core.contract import make_celery

    celery = make_celery(settings.broker)
    state = State()
    received = threading.Event()

    def on_event(ev: dict) -> None:
        state.event(ev)
        received.set()

    receivers = []

    def listen() -> None:
        with celery.connection() as conn:
            recv = celery.events.Receiver(conn, handlers={"*": on_event})
            receivers.append(recv)
            recv.capture(limit=None, timeout=60, wakeup=True)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        flower_view(client, state, received)
    finally:  # stop the receiver before the stack goes, or its thread dies on a closed socket
        for recv in receivers:
            recv.should_stop = True
        listener.join(10)


def flower_view(client, state, received: threading.Event) -> None:
    wait_until(received.is_set, 30, "the event receiver to hear a worker")  # heartbeats
    good = client.post("/plugins/echo/trigger?wait=60", json=json.loads(event())).json
    bad = client.post("/plugins/failing/trigger?wait=60", json=json.loads(event())).json
    wait_until(lambda: state.tasks.get(bad["invocation_id"]) is not None
               and state.tasks[bad["invocation_id"]].state == "FAILURE"
               and state.tasks.get(good["invocation_id"]) is not None
               and state.tasks[good["invocation_id"]].state == "SUCCESS", 30,
               "Flower's view of both runs")
    assert state.tasks[good["invocation_id"]].name == "plugin:echo"
    assert state.tasks[bad["invocation_id"]].name == "plugin:failing"
    # the run's summary, not the worker's words: what it published, or the plugin's stderr
    shown = state.tasks[good["invocation_id"]].result
    assert "succeeded in" in shown and "1 result event(s)" in shown and "-> test.v1/pong" in shown
    failure = state.tasks[bad["invocation_id"]].exception
    assert "failed in" in failure and "exited with code 3" in failure
    assert "about to fail" in failure and "database is on fire" in failure
    assert not [t for t in state.tasks.values() if t.name == "titan.run_plugin"]


def test_the_topic_label_is_bounded(bus: Bus, settings) -> None:
    from prometheus_client import REGISTRY

    def count(topic: str) -> float:
        return REGISTRY.get_sample_value("titan_events_received_total", {"topic": topic}) or 0

    other, known = count("other"), count("test.v1")
    ids = [new_id() for _ in range(3)]
    for n, event_id in enumerate(ids):
        bus.publish({"event_id": event_id, "topic": f"made.up.{new_id()}.{n}",
                     "event_type": "e"})
    bus.publish({"event_id": new_id(), "topic": "test.v1", "event_type": "nothing"})
    wait_until(lambda: count("other") >= other + 3 and count("test.v1") >= known + 1, 30,
               "the listener to count them")
    assert not [m for m in REGISTRY.collect() if m.name == "titan_events_received"
                for s in m.samples if s.labels.get("topic", "").startswith("made.up")]


def test_a_reload_that_rejects_a_plugin_exits_1_naming_it(settings, conn, tmp_path) -> None:
    """`reload` tells an author whose plugin it refused by its exit code (as `validate`
    does), in text and with --json, and says which plugin on stderr."""
    from manager.api.app import create_app
    from manager.bus.dispatch import Dispatcher
    from manager.core.contract import make_celery
    from manager.plugins.registry import Registry
    from manager.service import api_server

    plugins = tmp_path / "plugins"
    shutil.copytree(ROOT / "tests" / "plugins" / "echo", plugins / "echo")
    (plugins / "typo").mkdir()
    (plugins / "typo" / "plugin.yaml").write_text("name: typo\n")
    mine = settings.with_(plugins_dir=plugins, key_prefix=f"{settings.key_prefix}{new_id()}")
    app = create_app(wired(conn, mine), Registry(wired(conn, mine)),
                     Dispatcher(wired(conn, mine), make_celery(mine.broker)))
    (tmp_path / "api").mkdir(mode=0o700)
    server = api_server(app, mine.api, str(tmp_path / "api" / "api.sock"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        url = f"unix://{tmp_path / 'api' / 'api.sock'}"
        text, as_json = run_cli(url, "reload"), run_cli(url, "--json", "reload")
        shutil.rmtree(plugins / "typo")
        fixed = run_cli(url, "reload")
    finally:
        server.close()
    assert text.returncode == 1, (text.stdout, text.stderr)
    assert "added: echo" in text.stdout and "rejected: typo" in text.stdout
    assert "1 plugin(s) rejected: typo" in text.stderr
    assert as_json.returncode == 1
    assert [r["name"] for r in json.loads(as_json.stdout)["rejected"]] == ["typo"]
    assert fixed.returncode == 0, fixed.stderr


def test_a_reload_with_a_rejected_plugin_counts_as_partial(client, settings, conn,
                                                           tmp_path) -> None:
    from prometheus_client import REGISTRY

    from manager.api.app import create_app
    from manager.bus.dispatch import Dispatcher
    from manager.core.contract import make_celery
    from manager.plugins.registry import Registry

    def count(result: str) -> float:
        return REGISTRY.get_sample_value("titan_reloads_total", {"result": result}) or 0

    plugins = tmp_path / "plugins"
    (plugins / "typo").mkdir(parents=True)
    (plugins / "typo" / "plugin.yaml").write_text("name: typo\n")
    mine = settings.with_(plugins_dir=plugins, key_prefix=f"{settings.key_prefix}{new_id()}")
    own = create_app(wired(conn, mine), Registry(wired(conn, mine)),
                     Dispatcher(wired(conn, mine), make_celery(mine.broker))).test_client()
    before = count("partial")
    assert own.post("/plugins/reload").json["rejected"][0]["name"] == "typo"
    assert count("partial") == before + 1
