"""The built-in plugins against hostile input, through the real path."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from harness import Bus, build_pdf, new_id, records_of

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


def run(bus: Bus, conn, settings, plugin: str, topic: str, event_type: str, payload: dict,
        timeout: float = 120) -> tuple[dict, dict]:
    event_id = new_id()
    bus.publish({"event_id": event_id, "topic": topic, "event_type": event_type,
                 "payload": payload})
    caused = bus.result_of(event_id, timeout=timeout)
    record = next(r for r in records_of(conn, settings, plugin, 100)
                  if r["event_id"] == event_id)
    return record, caused


@pytest.mark.parametrize(("command", "refusal"), [
    ("ls; rm -rf /", "';' is not allowed"), ("echo $(id)", "'$' (substitution)"),
    ("echo `id`", "backticks"), ("ls && id", "'&' is not allowed"), ("ls | id", "'|'"),
    ("echo hi > /tmp/x", "redirection"), ("ls\nid", "a newline"), ("ls\rid", "carriage return"),
    ("ls\x00id", "NUL byte"), ("/bin/ls", "path-qualified"), ("LS", "not an allowed command"),
    ("date -s 2020-01-01", "flag '-s' is not allowed"), ("ls -R /", "flag '-R'"),
    ("echo -e '\\x41'", "backslash"), ("echo -e hi", "escape expansion is refused"),
    ("date 2020-01-01", "setting the clock is refused"), ("rm -rf /", "not an allowed command"),
])
def test_shell_runner_refuses_with_the_reason(bus, conn, settings, command: str,
                                               refusal: str) -> None:
    record, result = run(bus, conn, settings, "shell_runner", "system.v1", "run_cmd",
                         {"command": command})
    assert record["status"] == "succeeded"
    payload = result["payload"]
    assert payload["refused"] is True and refusal in payload["reason"], payload
    assert payload["exit_code"] is None and payload["command"] == command


@pytest.mark.parametrize(("command", "expect"), [
    ("echo hello world", "hello world\n"), ("whoami", "plugin\n"), ("pwd", "/plugin\n"),
    ("date -u +%Y", None), ("df -h", None), ("uptime", None), ("ls -la /plugin", "main.py"),
])
def test_shell_runner_runs_allowed_commands_in_the_sandbox(bus, conn, settings, command: str,
                                                           expect: str | None) -> None:
    _, result = run(bus, conn, settings, "shell_runner", "system.v1", "run_cmd",
                    {"command": command})
    payload = result["payload"]
    assert payload["refused"] is False and payload["exit_code"] == 0, payload
    if expect:
        assert expect in payload["stdout"]


def test_pdf_decompression_bomb_fails_within_limits(bus, conn, settings, files_dir: Path) -> None:
    compressor = zlib.compressobj(9)
    chunk = b"BT /F1 12 Tf (A) Tj ET\n" * 50_000  # about 1 MB of content, repeated to 1 GB
    bomb = b"".join(compressor.compress(chunk) for _ in range(1000)) + compressor.flush()
    path = files_dir / "bomb.pdf"
    path.write_bytes(build_pdf(bomb, "/FlateDecode"))
    record, failure = run(bus, conn, settings, "file_watcher", "fs.v1", "file_created",
                          {"path": str(path), "mime_type": "application/pdf"}, timeout=180)
    assert record["status"] in ("failed", "oom"), record
    assert failure["payload"]["status"] == record["status"]
    if record["status"] == "failed":
        assert "malformed or oversized PDF: LimitReachedError" in record["reason"], record
    path.unlink()


def test_malformed_pdf_fails_with_reason(bus, conn, settings, files_dir: Path) -> None:
    path = files_dir / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >> garbage \x00\xff")
    record, _ = run(bus, conn, settings, "file_watcher", "fs.v1", "file_created",
                    {"path": str(path), "mime_type": "application/pdf"}, timeout=180)
    assert record["status"] == "failed"
    assert "malformed or oversized PDF" in record["reason"], record
    path.unlink()


def test_a_100mb_text_file_gives_capped_text(bus, conn, settings, files_dir: Path) -> None:
    """Near the payload limit (TITAN_MAX_PAYLOAD_BYTES, 128 MiB by default; over it a
    file is refused by its size: tests/test_boundary.py)."""
    path = files_dir / "huge.txt"
    line = b"All work and no play makes Jack a dull boy.\n"
    with path.open("wb") as fh:
        for _ in range(100):
            fh.write(line * (1024 * 1024 // len(line) + 1))
    try:
        record, result = run(bus, conn, settings, "file_watcher", "fs.v1", "file_created",
                             {"path": str(path), "mime_type": "text/plain"}, timeout=180)
    finally:
        path.unlink()
    assert record["status"] == "succeeded", record
    payload = result["payload"]
    assert payload["truncated"] is True and len(payload["text"]) == 100_000
    assert payload["text"].startswith("All work and no play")
