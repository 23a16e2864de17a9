"""The REST API and the CLI, against the real pipeline (Redis, Celery worker, Docker)."""

from __future__ import annotations

import base64
import json

import pytest

from harness import Bus, new_id, run_cli, wired
from manager.api.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


def test_health_reports_each_part(client) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200, resp.json
    assert resp.json["redis"]["ok"] and resp.json["docker"]["ok"] and resp.json["workers"]["ok"]
    assert resp.json["workers"]["count"] >= 1


def test_plugins_listing_and_detail(client) -> None:
    names = {p["name"]: p for p in client.get("/plugins").json["plugins"]}
    assert names["shell_runner"]["status"] == "loaded"
    assert names["shell_runner"]["digest"].startswith("sha256:")
    detail = client.get("/plugins/file_watcher").json
    assert detail["triggers"] == [{"topic": "fs.v1", "event_type": "file_created"}]
    missing = client.get("/plugins/nope")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "plugin_not_found"


def test_trigger_with_wait_returns_finished_record(client, conn, settings) -> None:
    event = {"event_id": new_id(), "topic": "any.v1", "event_type": "whatever",
             "payload": {"command": "echo hello titan"}}
    resp = client.post("/plugins/shell_runner/trigger?wait=60", json=event)
    assert resp.status_code == 200, resp.json
    record = resp.json
    assert record["status"] == "succeeded" and record["origin"] == "api"
    assert json.loads(record["stdout"])["payload"]["stdout"] == "hello titan\n"
    again = client.get(f"/invocations/{record['invocation_id']}").json
    assert again["result_event_ids"] == record["result_event_ids"]
    runs = client.get("/plugins/shell_runner/invocations?limit=5").json["invocations"]
    assert record["invocation_id"] in [r["invocation_id"] for r in runs]


def test_trigger_twice_with_same_event_runs_twice(client) -> None:
    event = {"event_id": new_id(), "topic": "test.v1", "event_type": "ping"}
    first = client.post("/plugins/echo/trigger?wait=60", json=event).json
    second = client.post("/plugins/echo/trigger?wait=60", json=event).json
    assert first["invocation_id"] != second["invocation_id"]
    assert first["status"] == second["status"] == "succeeded"


def test_trigger_without_wait_is_accepted(client, bus: Bus) -> None:
    event_id = new_id()
    resp = client.post("/plugins/echo/trigger", json={"event_id": event_id, "topic": "x",
                                                      "event_type": "y"})
    assert resp.status_code == 202 and resp.json["invocation_id"]
    assert bus.result_of(event_id)["event_type"] == "pong"


def test_post_events_publishes_to_the_bus(client, bus: Bus) -> None:
    event_id = new_id()
    resp = client.post("/events", json={"event_id": event_id, "topic": "test.v1",
                                        "event_type": "ping"})
    assert resp.status_code == 202 and resp.json["event_id"] == event_id
    assert bus.result_of(event_id)["payload"]["plugin"] == "echo"


def test_bad_requests_get_json_errors_naming_the_problem(client) -> None:
    resp = client.post("/events", data=b'{"event_id": "x", "topic": "a"}')
    assert resp.status_code == 400
    assert resp.json["error"]["code"] == "invalid_event"
    assert resp.json["error"]["details"]["field"] == "event_type"
    assert client.get("/invocations/nope").status_code == 404
    assert client.get("/nowhere").json["error"]["code"] == "not_found"


def test_token_protects_everything_but_health(settings, conn, registry, dispatcher) -> None:
    app = create_app(wired(conn, settings.with_(api_token="s3cret")), registry, dispatcher)
    client = app.test_client()
    assert client.get("/plugins").status_code == 401
    assert client.get("/plugins", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/plugins", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_docs_are_served_offline(client) -> None:
    assert b"swagger-ui-bundle.js" in client.get("/docs").data
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200
    assert "/plugins/{name}/trigger" in client.get("/openapi.json").json["paths"]


def test_cli_list_trigger_show_health(api_url: str) -> None:
    listed = run_cli(api_url, "list")
    assert listed.returncode == 0, listed.stderr
    assert "shell_runner" in listed.stdout and "loaded" in listed.stdout
    event = json.dumps({"event_id": new_id(), "topic": "system.v1", "event_type": "run_cmd",
                        "payload": {"command": "whoami"}})
    ran = run_cli(api_url, "--json", "trigger", "shell_runner", "-e", event, "--wait")
    assert ran.returncode == 0, ran.stderr
    record = json.loads(ran.stdout)
    # a host uid of its own, named in the container's own /etc/passwd
    assert json.loads(record["stdout"])["payload"]["stdout"] == "plugin\n"
    shown = run_cli(api_url, "show", record["invocation_id"])
    assert "status succeeded" in shown.stdout
    assert run_cli(api_url, "health").returncode == 0


def test_cli_failures_exit_non_zero_with_a_reason(api_url: str, tmp_path) -> None:
    bad = run_cli(api_url, "trigger", "shell_runner", "-e", '{"event_id": "x"}')
    assert bad.returncode != 0 and "topic is required" in bad.stderr
    failed = run_cli(api_url, "trigger", "failing", "-e",
                 json.dumps({"event_id": new_id(), "topic": "t", "event_type": "e"}), "--wait")
    assert failed.returncode == 1 and "status failed" in failed.stdout
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps({"event_id": new_id(), "topic": "t", "event_type": "e"}))
    published = run_cli(api_url, "publish", "-e", f"@{event_file}")
    assert published.returncode == 0 and "published" in published.stdout
    no_history = run_cli(api_url, "rollback", "shell_runner")
    assert no_history.returncode == 1 and "no earlier version" in no_history.stderr
    unreachable = run_cli("http://127.0.0.1:1", "list")
    assert unreachable.returncode == 4 and "cannot reach the API" in unreachable.stderr


def test_standing_says_where_a_run_is(client) -> None:
    event = {"event_id": new_id(), "topic": "test.v1", "event_type": "ping"}
    done = client.post("/plugins/echo/trigger?wait=60", json=event).json
    standing = client.get(f"/invocations/{done['invocation_id']}/standing")
    assert standing.status_code == 200, standing.json
    at = standing.json
    assert (at["plugin"], at["status"], at["ahead"], at["running"]) == (
        "echo", "succeeded", 0, 0)
    assert 0 <= at["queued_s"] <= done["started_at"] - done["created_at"] + 0.001
    assert client.get("/invocations/nope/standing").status_code == 404


def test_secrets_are_set_listed_and_removed_never_shown(api_url: str, client, conn,
                                                        settings) -> None:
    value = "v-" + new_id()
    set_ = run_cli(api_url, "secret", "set", "cli_token", "--plugin", "shell_runner",
                   "--plugin", "nobody_yet", stdin=value + "\n")
    assert set_.returncode == 0, set_.stderr
    assert set_.stdout.strip() == (f"set cli_token: {len(value)} bytes, for nobody_yet, "
                                   "shell_runner (no plugin is named nobody_yet yet)")
    listed = run_cli(api_url, "secret", "list")
    assert "cli_token" in listed.stdout and f"{len(value)} B" in listed.stdout
    as_json = json.loads(run_cli(api_url, "--json", "secret", "list").stdout)
    assert value not in json.dumps(as_json) and value not in listed.stdout + set_.stdout
    assert value.encode() not in repr(conn.hgetall(settings.keys.secrets)).encode()
    assert client.get("/secrets/cli_token").status_code == 405  # no way to read one back
    bad = run_cli(api_url, "secret", "set", "Bad-Name", "--plugin", "x", stdin="v")
    assert bad.returncode == 1 and "must match" in bad.stderr
    empty = run_cli(api_url, "secret", "set", "cli_token", "--plugin", "x", stdin="")
    assert empty.returncode == 1 and "the value is empty" in empty.stderr
    assert run_cli(api_url, "secret", "rm", "cli_token").returncode == 0
    gone = run_cli(api_url, "secret", "rm", "cli_token")
    assert gone.returncode == 3 and "no secret named 'cli_token'" in gone.stderr


def test_a_secret_of_exactly_64_kib_is_taken_in_text_and_in_base64(client) -> None:
    """The bound is the store's, to the byte, whichever way the value is spelled: the
    schema refuses a longer text (400, naming the field), the store the one or two bytes
    a last base64 group can carry past it."""
    def put(value: bytes, encoding: str) -> object:
        spelled = value.decode() if encoding == "utf-8" else base64.b64encode(value).decode()
        return client.put("/secrets/edge_token", json={"value": spelled, "encoding": encoding,
                                                       "plugins": ["echo"]})
    for encoding in ("utf-8", "base64"):
        taken = put(b"x" * 65536, encoding)
        assert taken.status_code == 200 and taken.json["size"] == 65536, taken.json
    text = put(b"x" * 65537, "utf-8")
    assert text.status_code == 400 and "65536" in text.json["error"]["message"], text.json
    for size in (65537, 65538):
        over = put(b"x" * size, "base64")
        assert over.status_code == 400, over.json
        assert f"{size} bytes, over 65536" in over.json["error"]["message"]
    assert client.delete("/secrets/edge_token").status_code == 200
