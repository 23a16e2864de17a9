"""Test plugin: tries each step of payload.steps on the network and the file system,
and reports what happened (tests/test_egress.py)."""

import hashlib
import json
import os
import socket
import ssl
import sys
import time
import urllib.request


def get(step):
    handlers = []
    if "proxy" in step:  # another run's credentials, as a hostile plugin would use them
        handlers.append(urllib.request.ProxyHandler({"http": step["proxy"],
                                                     "https": step["proxy"]}))
    if "cadata" in step:
        context = ssl.create_default_context(cadata=step["cadata"])
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(step["url"], timeout=10) as resp:
            return {"status": resp.status, "body": resp.read().decode()[:200]}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()[:300]}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def connect(step):
    try:
        with socket.create_connection((step["host"], step["port"]), timeout=3):
            return {"connected": True}
    except OSError as exc:
        return {"connected": False, "error": str(exc)}


def resolve(step):
    try:
        return {"addresses": sorted({a[4][0] for a in socket.getaddrinfo(step["name"], 80)})}
    except OSError as exc:
        return {"error": str(exc)}


def secret(step):
    path = f"/run/secrets/{step['name']}"
    try:
        info = os.stat(path)
        with open(path) as fh:
            value = fh.read()
    except OSError as exc:
        return {"error": str(exc)}
    if step.get("say"):  # what a careless plugin does: masked by the worker
        print(f"the value is {value}", file=sys.stderr)
    in_env = any(value in v for v in os.environ.values())
    return {"sha256": hashlib.sha256(value.encode()).hexdigest(), "echo": value,
            "mode": oct(info.st_mode & 0o777), "uid": info.st_uid,
            "mine": info.st_uid == os.getuid(), "in_env": in_env}


def sleep(step):
    time.sleep(step["s"])
    return {}


def must_get(step):  # a plugin whose webhook is down fails
    found = get(step)
    if found.get("status") != 200:
        raise SystemExit(f"could not post: {found}")
    return found


STEPS = {"get": get, "must_get": must_get, "sleep": sleep, "connect": connect,
         "resolve": resolve, "secret": secret,
         "proxy_env": lambda step: {"value": os.environ.get("HTTP_PROXY", "")}}
event = json.loads(os.environ["EVENT_DATA"])
results = [STEPS[s["do"]](s) for s in event["payload"]["steps"]]
print(json.dumps({"topic": "egress.v1", "event_type": "probed", "payload": {"results": results}}))
