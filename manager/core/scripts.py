"""The Lua scripts (manager/core/lua/*.lua), each an atomic step of the record and slot
rules: a script is lib.lua's shared functions followed by its own file, registered once
per connection (redis-py's register_script: EVALSHA, the text sent once). Each script
names its keys and decodes its arguments, one JSON object, at its top."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import redis

LUA = Path(__file__).parent / "lua"


@cache
def source(name: str) -> str:
    return (LUA / "lib.lua").read_text() + "\n" + (LUA / f"{name}.lua").read_text()


def named(**arguments: Any) -> str:
    """A script's arguments: one JSON object (absent, not null, where a value is unset)."""
    return json.dumps({k: v for k, v in arguments.items() if v is not None})


class Scripts:
    """The scripts registered on one connection."""

    def __init__(self, conn: redis.Redis) -> None:
        self.create = conn.register_script(source("create"))
        self.transition = conn.register_script(source("transition"))
        self.claim = conn.register_script(source("claim"))
        self.store = conn.register_script(source("store"))
        self.acquire = conn.register_script(source("acquire"))
        self.renew = conn.register_script(source("renew"))
        self.hold = conn.register_script(source("hold"))
        self.unlock = conn.register_script(source("unlock"))
        self.tick = conn.register_script(source("tick"))
        self.later = conn.register_script(source("later"))
        self.due = conn.register_script(source("due"))
