"""The operators' console (/ui/), on a stack of its own: its keys, queue, worker,
listener, plugins and a TCP front with an API key, as `make up` serves it.

The first tests speak HTTP to it (the gate: sessions, CSRF, origins, headers); the last
drives Debian's Chromium through Playwright, as an operator would, with a hostile plugin
whose output, stderr and result are markup: any script run, CSP violation or console
error in any page fails it. With TITAN_CONSOLE_SHOTS=DIR it saves each page at 1280x800
(`make console-shots` writes docs/console/).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import redis

from harness import WorkerProcess, free_port, isolated, session_dir, wait_until, wired
from manager.api.app import create_app
from manager.bus.dispatch import Dispatcher
from manager.bus.listener import Listener, dead_letter
from manager.core.config import Settings
from manager.core.contract import make_celery
from manager.plugins.registry import Registry
from manager.service import tcp_api
from workers.container import remove_container
from workers.options import LABEL_HOST

pytestmark = pytest.mark.integration

MARKUP = ('<script>window.__pwned = "script"</script>'
          '<img src=x onerror="window.__pwned = \'img\'">'
          '<a href="javascript:window.__pwned = \'link\'">click</a>')
HOSTILE_MAIN = f"""import json, sys
MARKUP = {MARKUP!r}
print(MARKUP, file=sys.stderr)
print("javascript:window.__pwned = 'stderr'", file=sys.stderr)
print(json.dumps({{"topic": "console.v1", "event_type": "shown",
                  "payload": {{"html": MARKUP, "url": "javascript:window.__pwned = 'url'"}}}}))
"""


@dataclass
class Console:
    url: str  # http://127.0.0.1:PORT
    key: str
    settings: Settings
    conn: redis.Redis
    plugins: Path

    def request(self, method: str, path: str, body: dict[str, str] | None = None,
                cookies: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        where = urllib.parse.urlsplit(self.url)
        client = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        sent = {**(headers or {})}
        if cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        data = urllib.parse.urlencode(body).encode() if body is not None else None
        if data is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        client.request(method, path, body=data, headers=sent)
        answer = client.getresponse()
        answer.text = answer.read().decode()  # type: ignore[attr-defined]
        client.close()
        return answer

    def sign_in(self) -> tuple[dict[str, str], str]:
        """A session's cookie and its CSRF token, as a browser gets them."""
        form = self.request("GET", "/ui/signin")
        token = field_of(form.text, "csrf")
        pre = cookie_of(form, "titan_console_signin")
        done = self.request("POST", "/ui/signin", {"csrf": token, "key": self.key},
                            cookies={"titan_console_signin": pre})
        assert done.status == 303, done.text
        cookies = {"titan_console": cookie_of(done, "titan_console")}
        page = self.request("GET", "/ui/plugins", cookies=cookies)
        return cookies, field_of(page.text, "csrf")


def field_of(html: str, name: str) -> str:
    marker = f'name="{name}" value="'
    start = html.index(marker) + len(marker)
    return html[start:html.index('"', start)]


def cookie_of(answer: http.client.HTTPResponse, name: str) -> str:
    for header in answer.headers.get_all("Set-Cookie") or []:
        if header.startswith(f"{name}="):
            return header.split(";")[0].split("=", 1)[1]
    raise AssertionError(f"no {name} cookie in {answer.headers.get_all('Set-Cookie')}")


def write_plugin(root: Path, name: str, version: str, main: str, topic: str = "console.v1",
                 event_type: str = "show") -> None:
    (root / name).mkdir(exist_ok=True)
    (root / name / "plugin.yaml").write_text(
        f"name: {name}\nversion: {version}\ndescription: console test plugin\n"
        f"triggers:\n  - topic: {topic}\n    event_type: {event_type}\n"
        "entrypoint: python main.py\nimage: titan-runtime:py3.11\ntimeout: 20\n"
        "resources: {cpu: \"500m\", memory: \"64Mi\"}\n")
    (root / name / "main.py").write_text(main)


@pytest.fixture(scope="module")
def console(settings: Settings, conn: redis.Redis,
            docker_client: docker.DockerClient) -> Iterator[Console]:
    plugins = Path(tempfile.mkdtemp(prefix="titan-test-console-", dir=session_dir()))
    shutil.copytree(Path(__file__).parent / "plugins" / "echo", plugins / "echo")
    write_plugin(plugins, "markup", "1.0.0", HOSTILE_MAIN)
    key = secrets.token_urlsafe(24)
    host = f"consolehost-{uuid.uuid4().hex[:6]}"  # its containers' titan.host label
    mine, registry = isolated(settings, conn, plugins_dir=plugins, api_token=key,
                              worker_name=host,
                              dead_stream=f"{settings.dead_stream}.{host}")
    dispatcher = Dispatcher(wired(conn, mine), make_celery(mine.broker))
    worker = WorkerProcess(mine, f"consoleworker{uuid.uuid4().hex[:6]}")
    listener = Listener(wired(redis.Redis.from_url(mine.redis_url), mine),
                        Registry(wired(redis.Redis.from_url(mine.redis_url), mine)), dispatcher)
    threading.Thread(target=listener.run, daemon=True).start()
    app = create_app(wired(conn, mine), registry, dispatcher)
    port = free_port()
    front_dir = session_dir() / f"console-{uuid.uuid4().hex[:6]}"
    front_dir.mkdir(mode=0o700)
    server, front = tcp_api(app, mine.with_(api_port=port, api_socket=front_dir / "api.sock").api)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        worker.wait_ready(conn)
        yield Console(f"http://127.0.0.1:{port}", key, mine, conn, plugins)
    finally:
        front.stop()
        server.close()
        listener.stop()
        worker.stop()
        for c in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_HOST}={host}"}):
            remove_container(c)
        shutil.rmtree(plugins, ignore_errors=True)
        for key_name in conn.scan_iter(f"{mine.key_prefix}:*"):
            conn.delete(key_name)
        conn.delete(mine.event_stream, mine.dead_stream)


def test_pages_need_a_session_and_the_key_opens_one(console: Console) -> None:
    assert console.request("GET", "/ui/").status == 302
    assert console.request("GET", "/ui/runs.json").status == 401
    # the API's bearer token is not a console session, nor is a made-up cookie
    assert console.request("GET", "/ui/plugins", cookies={"titan_console": "x" * 43},
                           headers={"Authorization": f"Bearer {console.key}"}).status == 302
    form = console.request("GET", "/ui/signin")
    wrong = console.request("POST", "/ui/signin",
                            {"csrf": field_of(form.text, "csrf"), "key": "not-the-key"},
                            cookies={"titan_console_signin":
                                     cookie_of(form, "titan_console_signin")})
    assert wrong.status == 401 and "not the API key" in wrong.text
    assert "titan_console=" not in " ".join(wrong.headers.get_all("Set-Cookie") or [])
    cookies, _ = console.sign_in()
    assert console.request("GET", "/ui/", cookies=cookies).status == 200


def test_the_session_cookie_is_httponly_strict_and_never_holds_the_key(console: Console,
                                                                       ) -> None:
    form = console.request("GET", "/ui/signin")
    done = console.request("POST", "/ui/signin",
                           {"csrf": field_of(form.text, "csrf"), "key": console.key},
                           cookies={"titan_console_signin":
                                    cookie_of(form, "titan_console_signin")})
    header = next(h for h in done.headers.get_all("Set-Cookie")
                  if h.startswith("titan_console="))
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/ui/" in header
    assert console.key not in header and console.key not in done.headers.get("Location", "")
    # a sign-in form without its own token (a cross-site form) opens nothing
    forged = console.request("POST", "/ui/signin", {"csrf": "forged", "key": console.key})
    assert forged.status == 401 and "expired" in forged.text


@pytest.mark.parametrize("path", ["/ui/plugins/reload", "/ui/plugins/echo/rollback",
                                  "/ui/dead/1-0/replay", "/ui/signout"])
def test_no_action_runs_without_the_pages_token_from_this_origin_or_by_get(
        console: Console, path: str) -> None:
    cookies, csrf = console.sign_in()
    # (a GET of an action's path is no action: 405, or 404 where a page has that shape)
    assert console.request("GET", path, cookies=cookies).status in (404, 405)
    missing = console.request("POST", path, {}, cookies=cookies)
    assert missing.status == 403 and "CSRF" in missing.text
    elsewhere = console.request("POST", path, {"csrf": csrf}, cookies=cookies,
                                headers={"Origin": "http://evil.example"})
    assert elsewhere.status == 403 and "another origin" in elsewhere.text
    # and the session still works: refusals change nothing
    assert console.request("GET", "/ui/plugins", cookies=cookies).status == 200


def test_signing_out_ends_the_session_for_a_copied_cookie_too(console: Console) -> None:
    cookies, csrf = console.sign_in()
    out = console.request("POST", "/ui/signout", {"csrf": csrf}, cookies=cookies)
    assert out.status == 303
    assert console.request("GET", "/ui/plugins", cookies=cookies).status == 302
    assert console.request("GET", "/ui/runs.json", cookies=cookies).status == 401


@pytest.mark.parametrize("path", ["/ui/signin", "/ui/", "/ui/plugins", "/ui/runs",
                                  "/ui/dead", "/ui/workers", "/ui/runs/nope"])
def test_every_page_forbids_inline_script_framing_and_caching(console: Console,
                                                              path: str) -> None:
    cookies, _ = console.sign_in()
    page = console.request("GET", path, cookies=cookies)
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    assert "<script>" not in page.text  # the one script is a file


def publish(console: Console, event_type: str, payload: dict[str, Any]) -> str:
    event_id = uuid.uuid4().hex
    console.conn.xadd(console.settings.event_stream, {"event": json.dumps({
        "event_id": event_id, "topic": "console.v1" if event_type == "show" else "test.v1",
        "event_type": event_type, "payload": payload})})
    return event_id


def test_an_operator_works_the_console_in_a_browser(console: Console) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = os.environ.get("TITAN_CONSOLE_SHOTS")
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"),
                                     args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
        page.set_default_timeout(60_000)

        def shot(name: str) -> None:
            assert page.evaluate("window.__pwned") is None, page.evaluate("window.__pwned")
            assert not problems, problems
            if shots:
                page.screenshot(path=str(Path(shots) / f"{name}.png"))

        page.goto(f"{console.url}/ui/")
        expect(page).to_have_url(f"{console.url}/ui/signin")
        shot("signin")
        page.fill("input[name=key]", console.key)
        page.click("button[type=submit]")
        expect(page.locator("h1")).to_have_text("Overview")

        # a run appears in the live list, without reloading the page, and ends
        page.goto(f"{console.url}/ui/runs")
        before = page.evaluate("performance.getEntriesByType('navigation').length")
        publish(console, "show", {"html": MARKUP})
        row = page.locator("#runs tbody tr", has_text="markup").first
        expect(row.locator(".status")).to_have_text("succeeded")
        assert page.evaluate("performance.getEntriesByType('navigation').length") == before
        shot("runs")

        # its page: the result, the timeline, the hostile stderr shown as text
        row.locator("a").click()
        expect(page.locator("#run-status")).to_have_text("succeeded")
        expect(page.locator(".result-payload")).to_contain_text("<script>window.__pwned")
        expect(page.locator("#stderr")).to_contain_text("onerror=")
        steps = page.locator("#timeline li strong").all_inner_texts()
        assert steps == ["queued", "started", "succeeded"], steps
        expect(page.locator("#timeline")).to_contain_text("consoleworker")
        shot("run")

        # a new version, reloaded from the console, then rolled back
        write_plugin(console.plugins, "markup", "1.1.0", HOSTILE_MAIN)
        page.goto(f"{console.url}/ui/plugins")
        page.click("#reload")
        expect(page.locator(".flash.ok")).to_contain_text("updated markup")
        expect(page.locator("tr[data-plugin=markup]")).to_contain_text("1.1.0")
        shot("plugins")
        page.goto(f"{console.url}/ui/plugins/markup")
        page.click("text=Roll back to 1.0.0")
        expect(page.locator(".flash.ok")).to_contain_text("markup is serving 1.0.0 again")
        expect(page.locator("#versions")).to_contain_text("serving")
        shot("plugin")

        # dead letters: one replayed, one whose refusal is explained
        valid = json.dumps({"event_id": uuid.uuid4().hex, "topic": "test.v1",
                            "event_type": "ping", "payload": {"n": 1}})
        dead_letter(console.conn, console.settings.stream, valid, "unprocessable", "a test's")
        dead_letter(console.conn, console.settings.stream, MARKUP, "invalid_event", MARKUP)
        page.goto(f"{console.url}/ui/dead")
        assert page.locator("article.dead").count() == 2
        page.locator("article.dead", has_text="invalid_event").locator("button").click()
        expect(page.locator(".flash.error")).to_contain_text("can never be replayed")
        page.locator("article.dead", has_text="unprocessable").locator("button").click()
        expect(page.locator(".flash.ok")).to_contain_text("replayed")
        shot("dead")
        wait_until(lambda: console_runs(console, "echo"), 60, "the replayed run")

        page.goto(f"{console.url}/ui/workers")
        expect(page.locator("#workers")).to_contain_text("consoleworker")
        shot("workers")
        page.goto(f"{console.url}/ui/")
        expect(page.locator("#ended")).not_to_have_text("0")
        # a locator, not wait_for_function: its polling evals a string, which the console's
        # CSP (script-src 'self') refuses once the first look finds the chart not drawn yet
        expect(page.locator("#chart polyline")).to_have_count(2)
        shot("overview")

        page.click("text=Sign out")
        expect(page).to_have_url(f"{console.url}/ui/signin")
        page.goto(f"{console.url}/ui/runs")
        expect(page).to_have_url(f"{console.url}/ui/signin")
        browser.close()
    assert not problems, problems


def console_runs(console: Console, plugin: str) -> list[Any]:
    return wired(console.conn, console.settings).records.for_plugin(plugin)
