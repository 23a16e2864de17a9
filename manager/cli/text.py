"""How the CLI prints what the API answers (text; `--json` prints the answer itself)."""

from __future__ import annotations

import time
from typing import Any

from manager.cli.waits import queued_s
from manager.core.records import shown_payload


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def produced(rec: dict[str, Any]) -> list[str]:
    """What the run published: one line per result event, its payload whole."""
    return [f"  -> {r['topic']}/{r['event_type']} {shown_payload(r)}  ({r['event_id']})"
            for r in rec.get("results") or []]


def connections(rec: dict[str, Any]) -> list[str]:
    """Each request the run sent the egress proxy: allowed with its status and bytes, or
    refused with why."""
    lines = []
    for c in rec.get("egress") or []:
        target = f"{c['method']} {c['host']}:{c['port']}"
        if c["decision"] == "allowed":
            lines.append(f"  net: allowed {target} -> {c.get('status')}, "
                         f"{c.get('bytes_sent', 0)} B sent, {c.get('bytes_received', 0)} B "
                         "received" + (f" ({c['why']})" if c.get("why") else ""))
        else:
            lines.append(f"  net: refused {target}: {c.get('why')}")
    return lines


def describe(rec: dict[str, Any]) -> str:
    lines = [f"invocation {rec['invocation_id']}  plugin {rec.get('plugin')}@"
             f"{rec.get('version')}  status {rec.get('status')}"]
    shown = {**rec, "queued_s": queued_s(rec)}
    for key in ("reason", "exit_code", "queued_s", "duration_s", "attempts", "worker", "warm"):
        if shown.get(key) not in (None, "", []):
            lines.append(f"  {key}: {shown[key]}")
    lines += produced(rec) + connections(rec)
    lines += [f"  sent again ({h['status']}): {h['reason']}" for h in rec.get("history") or []]
    for stream in ("stdout", "stderr"):
        if rec.get(stream):
            lines.append(f"  {stream}:\n    " + rec[stream].rstrip()[:4000].replace("\n", "\n    "))
    return "\n".join(lines)


def status_of(plugin: dict[str, Any]) -> str:
    """A plugin's status for `list`: INVALID or DRAFT in capitals; a loaded one whose
    directory now holds an edit that was rejected, or a draft, says so (its VERSION is the
    one still serving)."""
    if plugin["status"] != "loaded":
        return plugin["status"].upper()
    if plugin["errors"]:
        return "loaded, edit REJECTED"
    return f"loaded, DRAFT {plugin['draft']} waits" if plugin.get("draft") else "loaded"


def trigger_text(trigger: dict[str, Any]) -> str:
    """An event trigger as topic/event_type; a timer as its spec and its next fire time."""
    if "topic" in trigger:
        return f"{trigger['topic']}/{trigger['event_type']}"
    spec = trigger.get("schedule") or f"every {trigger['every']}"
    zone = "" if trigger["timezone"] == "UTC" else f" {trigger['timezone']}"
    return f"timer '{spec}'{zone}, next {trigger['next'][0]}"


def plugin_table(data: dict[str, Any]) -> str:
    """`list`'s table: invalid plugins in capitals, a rolled-back one marked, a rejected
    edit named beside the version that still serves."""
    rows = [[p["name"], status_of(p),
             (p["version"] or "") + (" (rolled back)" if p.get("rolled_back_from") else ""),
             (p["digest"] or "")[7:19],
             ", ".join(trigger_text(t) for t in p["triggers"]), queue_text(p.get("queue")),
             "; ".join([*p["errors"], *(f"warning: {w}" for w in p.get("warnings", []))])]
            for p in sorted(data["plugins"], key=lambda p: p["name"])]
    return table(rows, ["NAME", "STATUS", "VERSION", "DIGEST", "TRIGGERS", "QUEUED",
                        "PROBLEMS"])


def queue_text(line: dict[str, Any] | None) -> str:
    """`3, oldest 12.5s`, or `0`."""
    if not line or not line["depth"]:
        return "0"
    return f"{line['depth']}, oldest {line['oldest_wait_s']:.1f}s"


def log_entry(rec: dict[str, Any]) -> str:
    """One run as `logs` shows it: a status line (with the version that ran: after a
    reload or a rollback, runs of two versions sit side by side), what it published,
    then the plugin's log (stderr)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("created_at") or 0))
    head = f"{when}  {rec['invocation_id']}  {rec.get('version') or '?'}  {rec['status']}"
    if queued_s(rec) is not None:
        head += f"  queued {queued_s(rec)}s"
    if rec.get("duration_s") is not None:
        head += f"  ran {rec['duration_s']}s"
    if rec.get("reason"):
        head += f"  {rec['reason']}"
    lines = [head, *produced(rec), *connections(rec)]
    stderr = (rec.get("stderr") or "").rstrip()
    if stderr:
        lines.append("  " + stderr[-4000:].replace("\n", "\n  "))
    return "\n".join(lines)


def reload_text(data: dict[str, Any]) -> str:
    """`reload`'s answer: each change with its version and digest, what still serves a
    rejected or unsettled plugin, then errors and warnings."""
    def ref(r: dict[str, Any] | None) -> str:
        return f"{r['version']} ({r['digest'][7:19]})" if r else "nothing"

    lines = [f"added: {a['name']} {ref(a)}" for a in data["added"]]
    lines += [f"updated: {u['name']} {ref(u['from'])} -> {ref(u['to'])}"
              for u in data["updated"]]
    lines += [f"removed: {name}" for name in data["removed"]]
    lines += [f"rejected: {r['name']} (serving {ref(r.get('serving'))}): "
              f"{'; '.join(r['errors'])}" for r in data["rejected"]]
    lines += [f"draft: {d['name']} {ref(d)} (out of service until `draft: true` is deleted; "
              f"serving {ref(d.get('serving'))})" for d in data.get("drafts", [])]
    lines += [f"unsettled: {u['name']} (still being written; serving {ref(u.get('serving'))})"
              for u in data.get("unsettled", [])]
    lines += [f"warning: {w['name']}: {'; '.join(w['warnings'])}"
              for w in data.get("warnings", [])]
    return "\n".join(lines) or "no changes"


def versions_text(data: dict[str, Any]) -> str:
    """`versions NAME`: the kept versions, newest first, the serving one marked."""
    rows = [["*" if v["serving"] else "", v["version"], v["digest"][7:19],
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["loaded_at"] or 0))]
            for v in data["versions"]]
    return table(rows, ["", "VERSION", "DIGEST", "LOADED"])
