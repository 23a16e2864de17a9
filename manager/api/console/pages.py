"""The console's pages (/ui/): server-rendered HTML over the same context as the API,
with one script file that keeps the overview and the runs list live by polling their
`.json` twins. Actions are forms posting to the same operations the API offers (reload,
rollback, replay), so the console can do nothing the API cannot."""

from __future__ import annotations

import json
import secrets
from typing import Any

from flask import (
    Blueprint,
    abort,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException

from manager.api.bus_routes import replay as replay_dead
from manager.api.console import guard, views
from manager.api.console.sessions import COOKIE, SIGNIN_COOKIE, TTL_S, key_matches
from manager.api.context import api_context as ctx
from manager.api.context import error, reload_registry
from manager.core.errors import DeadLetterNotFound, EventError, TitanError

console = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates",
                    static_folder="static")
console.before_request(guard.check)
console.after_request(guard.secure)


@console.context_processor
def _shared() -> dict[str, Any]:
    session = g.get("console")
    told = guard.sessions().told(request.cookies.get(COOKIE)) if session else []
    return {"csrf": session.csrf if session else "", "statuses": views.STATUSES,
            "messages": told}


@console.app_template_filter("pretty")
def pretty(value: Any) -> str:
    """JSON as a person reads it; the template escapes it like any other text (Jinja's
    `tojson` writes `<` as `\\u003c`: safe in a script, unreadable in a page)."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def tell(text: str, category: str) -> None:
    """Shown once, on the page the action redirects to."""
    guard.sessions().tell(request.cookies.get(COOKIE), category, text)


@console.route("/signin", methods=["GET", "POST"])
def sign_in() -> Any:
    """The API key, once; then a session cookie (the key is never in a URL or a cookie)."""
    error = ""
    if request.method == "POST":
        form_token = request.form.get("csrf", "")
        cookie_token = request.cookies.get(SIGNIN_COOKIE, "")
        if not form_token or not secrets.compare_digest(form_token, cookie_token):
            error = "the sign-in form expired: try again"
        elif not key_matches(request.form.get("key", ""), ctx().settings.api_token):
            error = "that is not the API key (run/api.token, or TITAN_API_TOKEN)"
        else:
            response = redirect(url_for("console.overview"), 303)
            response.set_cookie(COOKIE, guard.sessions().open(ctx().settings.api_token),
                                max_age=TTL_S, **guard.cookie_options())
            response.delete_cookie(SIGNIN_COOKIE, path="/ui/")
            return response
    token = secrets.token_urlsafe(32)
    response = make_response(render_template("signin.html", signin_csrf=token, error=error),
                             401 if error else 200)
    response.set_cookie(SIGNIN_COOKIE, token, max_age=900, **guard.cookie_options())
    return response


@console.post("/signout")
def sign_out() -> Any:
    guard.sessions().close(request.cookies.get(COOKIE))
    response = redirect(url_for("console.sign_in"), 303)
    response.delete_cookie(COOKIE, path="/ui/")
    return response


@console.get("/")
def overview() -> Any:
    return render_template("overview.html", data=views.overview(ctx()))


@console.get("/overview.json")
def overview_json() -> Any:
    return jsonify(views.overview(ctx()))


@console.get("/plugins")
def plugins() -> Any:
    return render_template("plugins.html", rows=views.plugin_rows(ctx()))


@console.get("/plugins/<name>")
def plugin(name: str) -> Any:
    data = views.plugin_page(ctx(), name)
    if data["entry"] is None and not data["runs"]:
        abort(404, f"no plugin named {name!r}")
    return render_template("plugin.html", name=name, data=data)


@console.post("/plugins/reload")
def reload_plugins() -> Any:
    changes = reload_registry(ctx())
    tell(summary_of(changes), "error" if changes["rejected"] else "ok")
    return redirect(url_for("console.plugins"), 303)


def summary_of(changes: dict[str, list[Any]]) -> str:
    parts = [f"{kind} {', '.join(c['name'] for c in found)}"
             for kind, found in changes.items() if found and kind != "warnings"]
    rejected = "; ".join(f"{c['name']}: {'; '.join(c['errors'])}"
                         for c in changes.get("rejected", []))
    said = "reloaded: " + ("; ".join(parts) if parts else "nothing changed")
    return f"{said}. Rejected: {rejected}" if rejected else said


@console.post("/plugins/<name>/rollback")
def rollback(name: str) -> Any:
    try:
        done = ctx().registry.rollback(name, request.form.get("version") or None)
        tell(f"{name} is serving {done['to']['version']} again", "ok")
    except TitanError as exc:
        tell(f"rollback refused: {exc.message}", "error")
    return redirect(url_for("console.plugin", name=name), 303)


@console.get("/runs")
def runs() -> Any:
    plugin_name, status = filters()
    found = views.recent_runs(ctx(), plugin_name, status)
    return render_template("runs.html", runs=found,
                           plugin=plugin_name, status=status,
                           plugins=sorted(ctx().registry.entries()))


@console.get("/runs.json")
def runs_json() -> Any:
    plugin_name, status = filters()
    return jsonify({"runs": views.recent_runs(ctx(), plugin_name, status)})


def filters() -> tuple[str, str]:
    plugin_name = request.args.get("plugin", "")[:200]
    status = request.args.get("status", "")
    if status and status not in views.STATUSES:
        abort(400, f"no status {status[:50]!r}: one of {', '.join(views.STATUSES)}")
    return plugin_name, status


@console.get("/runs/<invocation_id>")
def run(invocation_id: str) -> Any:
    record = ctx().records.get(invocation_id)
    if record is None:
        abort(404, f"no run {invocation_id[:100]!r} (unknown or expired)")
    return render_template("run.html", run=record, steps=views.timeline(record),
                           event=(record.request or {}).get("event"))


@console.get("/dead")
def dead() -> Any:
    return render_template("dead.html", letters=views.dead_letters(ctx()))


@console.post("/dead/<entry_id>/replay")
def replay(entry_id: str) -> Any:
    try:
        event, published = replay_dead(ctx(), entry_id)
        tell(f"replayed {entry_id} as entry {published} (event {event.event_id})", "ok")
    except DeadLetterNotFound as exc:
        abort(404, exc.message)
    except EventError as exc:
        tell(exc.message, "error")
    return redirect(url_for("console.dead"), 303)


@console.get("/workers")
def workers() -> Any:
    return render_template("workers.html", workers=views.workers(ctx()))


@console.errorhandler(HTTPException)
def _refused(exc: HTTPException) -> Any:
    """A page's error as a page; a data request's as the API's JSON error."""
    if request.path.endswith(".json"):
        return error((exc.name or "error").lower().replace(" ", "_"),
                     exc.description or "", exc.code or 500)
    return render_template("error.html", code=exc.code, name=exc.name,
                           message=exc.description), exc.code
