"""The console's gate: who may see a page, whether an action is the console's own, and
the headers every page goes out with.

- A page needs a session (manager.api.console.sessions); without one, a page redirects to
  the sign-in form and a data request answers 401.
- Every action is a POST carrying the session's CSRF token (a form field or the
  `X-CSRF-Token` header), and, when the browser names an Origin, from this origin; no
  action is reachable by GET. The cookie is SameSite=Strict besides.
- Every answer forbids inline script, `eval`, other origins and framing (CSP), sniffing
  and caching; referrers leave for this origin only (with `no-referrer` a browser
  names its own form posts' Origin `null`).
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

from flask import abort, g, redirect, request, url_for

from manager.api.console.sessions import COOKIE, Sessions
from manager.api.context import api_context as ctx

OPEN_ENDPOINTS = ("console.sign_in", "console.static")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store", "Cross-Origin-Opener-Policy": "same-origin"}


def sessions() -> Sessions:
    return Sessions(ctx().conn, ctx().keys)


def check() -> Any:
    """Runs before every console request."""
    if request.method == "POST":
        same_origin()
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    session = sessions().find(request.cookies.get(COOKIE), ctx().settings.api_token)
    if session is None:
        if request.path.endswith(".json"):
            abort(401, "sign in first: /ui/signin")
        return redirect(url_for("console.sign_in"))
    g.console = session
    if request.method == "POST":
        given = request.form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            abort(403, "this action did not come from the console's own page "
                       "(its CSRF token is missing or wrong): reload the page and try again")
    return None


def same_origin() -> None:
    """A browser names the page an action came from; it must be this server's."""
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser (the CSRF token is still asked for)
        return
    if urlsplit(origin).netloc != request.host:
        abort(403, f"an action from another origin ({origin}) is refused")


def secure(response: Any) -> Any:
    response.headers.update(HEADERS)
    return response


def cookie_options() -> dict[str, Any]:
    """HttpOnly and SameSite=Strict always; Secure when the page came over TLS."""
    return {"httponly": True, "samesite": "Strict", "path": "/ui/",
            "secure": request.is_secure or ctx().settings.api_tls}
