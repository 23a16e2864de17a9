"""End to end: an event XADDed to the stream becomes a result event on the stream, through
the real listener, a real Celery worker process and a real container."""

from __future__ import annotations

import json

import pytest

from harness import Bus, build_pdf, new_id, records_of

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


def record_for(conn, settings, plugin: str, event_id: str) -> dict:
    records = records_of(conn, settings, plugin, 200)
    return next(r for r in records if r["event_id"] == event_id)


def test_shell_runner_event_yields_cmd_result(bus: Bus, conn, settings) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "system.v1", "event_type": "run_cmd",
                 "payload": {"command": "uname -a"}, "correlation_id": "corr-1", "hops": 2})
    result = bus.result_of(event_id)
    assert result["topic"] == "system.v1" and result["event_type"] == "cmd_result"
    assert result["payload"]["exit_code"] == 0
    assert result["payload"]["stdout"].startswith("Linux plugin ")
    assert result["source"] == "plugin:shell_runner@1.0.0"
    assert result["correlation_id"] == "corr-1"
    assert result["hops"] == 3
    record = record_for(conn, settings, "shell_runner", event_id)
    assert record["status"] == "succeeded"
    assert record["result_event_ids"] == [result["event_id"]]
    assert record["exit_code"] == 0 and record["attempts"] == 1 and record["worker"]


def test_shell_runner_refuses_shell_syntax(bus: Bus) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "system.v1", "event_type": "run_cmd",
                 "payload": {"command": "ls; rm -rf /"}})
    result = bus.result_of(event_id)
    assert result["payload"]["refused"] is True
    assert "';' is not allowed" in result["payload"]["reason"]
    assert result["payload"]["exit_code"] is None


def test_file_watcher_extracts_markdown_in_latin1(bus: Bus, files_dir) -> None:
    path = files_dir / "notes.md"
    text = ("# Café de la Gare\n\nLe menu du déjeuner: crème brûlée, tarte à la citrouille, "
            "pâté de campagne et café très noir. Les élèves préfèrent les crêpes; les "
            "professeurs préfèrent le gâteau. Ça coûte trop cher, disent-ils, mais c'est "
            "délicieux.\n")
    path.write_bytes(text.encode("latin-1"))
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "fs.v1", "event_type": "file_created",
                 "payload": {"path": str(path), "mime_type": "text/markdown"}})
    result = bus.result_of(event_id, timeout=180)  # first run installs pypdf on this host
    assert result["event_type"] == "file_text_extracted", result
    assert result["payload"]["text"] == text
    assert result["payload"]["truncated"] is False
    assert result["payload"]["chars"] == len(text)


def test_file_watcher_extracts_pdf(bus: Bus, files_dir) -> None:
    path = files_dir / "report.pdf"
    path.write_bytes(build_pdf(b"BT /F1 24 Tf 72 720 Td (Quarterly report for Titan) Tj ET"))
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "fs.v1", "event_type": "file_created",
                 "payload": {"path": str(path), "mime_type": "application/pdf"}})
    result = bus.result_of(event_id, timeout=180)
    assert result["event_type"] == "file_text_extracted", result
    assert "Quarterly report for Titan" in result["payload"]["text"]
    assert result["payload"]["pages"] == 1


def test_file_watcher_unsupported_type_is_a_clear_failure(bus: Bus, conn, settings,
                                                          files_dir) -> None:
    path = files_dir / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "fs.v1", "event_type": "file_created",
                 "payload": {"path": str(path), "mime_type": "image/png"}})
    failure = bus.result_of(event_id, timeout=180)
    assert failure["event_type"] == "invocation_failed"
    assert "unsupported file type" in failure["payload"]["reason"]


def test_plugin_with_requirements_imports_them_without_network(bus: Bus) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "deps"})
    result = bus.result_of(event_id, timeout=180)
    assert result["event_type"] == "deps_ok", result
    assert result["payload"]["six"] == "1.16.0"
    assert result["payload"]["file"].startswith("/titan/deps/")


def test_plugin_receives_documented_inputs(bus: Bus, conn, settings) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "ping",
                 "payload": {"greeting": "héllo", "n": [1, 2, 3]}})
    result = bus.result_of(event_id)
    assert result["payload"]["echo"] == {"greeting": "héllo", "n": [1, 2, 3]}
    assert result["payload"]["event_file_matches"] is True
    assert result["payload"]["plugin"] == "echo" and result["payload"]["version"] == "0.1.0"
    record = record_for(conn, settings, "echo", event_id)
    assert result["payload"]["invocation_id"] == record["invocation_id"]


def test_failing_plugin_has_failed_record_and_failure_event(bus: Bus, conn, settings) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "fail"})
    failure = bus.result_of(event_id)
    assert failure["topic"] == "plugins.v1" and failure["event_type"] == "invocation_failed"
    payload = failure["payload"]
    assert payload["plugin"] == "failing" and payload["event_id"] == event_id
    assert payload["status"] == "failed"
    assert payload["reason"] == "exited with code 3: database is on fire"
    record = record_for(conn, settings, "failing", event_id)
    assert record["status"] == "failed" and record["exit_code"] == 3
    assert "database is on fire" in record["stderr"]
    assert record["invocation_id"] == payload["invocation_id"]


def test_timeout_kills_a_plugin_that_ignores_sigterm(bus: Bus, conn, settings) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "slow"})
    failure = bus.result_of(event_id)
    assert failure["payload"]["status"] == "timeout"
    assert failure["payload"]["reason"] == "timed out after 2s"
    record = record_for(conn, settings, "slow", event_id)
    assert record["stdout"] == "sleeping\n"


def test_one_event_runs_every_matching_plugin_once(bus: Bus, conn, settings) -> None:
    # echo matches test.v1/ping; publish the same event_id twice: still one run.
    event_id = new_id()
    event = {"event_id": event_id, "topic": "test.v1", "event_type": "ping"}
    bus.publish(event)
    bus.publish(event)
    bus.result_of(event_id)
    second = bus.publish({"event_id": new_id(), "topic": "test.v1", "event_type": "ping"})
    bus.wait_event(lambda d: d.get("event") and d["event"].get("causation_id") is not None
                   and d["event"]["event_type"] == "pong", after=second)
    runs = [r for r in records_of(conn, settings, "echo", 500)
            if r["event_id"] == event_id]
    assert len(runs) == 1


def test_invalid_events_are_dead_lettered_with_reason(bus: Bus) -> None:
    cases = {
        "not json {": "invalid_json",
        json.dumps([1, 2]): "not_an_object",
        json.dumps({"event_id": "x", "event_type": "y"}): "missing_field",
        json.dumps({"event_id": "bad id!", "topic": "a", "event_type": "b"}): "invalid_field",
    }
    for raw, reason in cases.items():
        entry = bus.publish(raw)
        dead = bus.dead_letter(entry)
        assert dead["reason"] == reason, (raw, dead)
        assert dead["detail"]


def test_hops_over_the_limit_are_dead_lettered(bus: Bus, settings) -> None:
    entry = bus.publish({"event_id": new_id(), "topic": "test.v1", "event_type": "ping",
                         "hops": settings.max_hops + 1})
    dead = bus.dead_letter(entry)
    assert dead["reason"] == "hops_exceeded"


def test_payload_path_outside_allowed_globs_is_rejected(bus: Bus, conn, settings) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "fs.v1", "event_type": "file_created",
                 "payload": {"path": "/etc/shadow", "mime_type": "text/plain"}})
    failure = bus.result_of(event_id)
    assert failure["payload"]["status"] == "rejected"
    assert "outside the plugin's allowed paths" in failure["payload"]["reason"]
    record = record_for(conn, settings, "file_watcher", event_id)
    assert record["status"] == "rejected" and record.get("exit_code") is None


def test_endless_stdout_is_stopped_at_the_cap(bus: Bus, conn, settings) -> None:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": "test.v1", "event_type": "chatty"})
    failure = bus.result_of(event_id)
    assert failure["payload"]["status"] == "output_limit"
    assert failure["payload"]["reason"] == f"stdout exceeded {settings.output_cap_bytes} bytes"
    record = record_for(conn, settings, "chatty", event_id)
    assert record["stdout_truncated"] is True
    assert len(record["stdout"]) == settings.output_cap_bytes
