"""Plugin secrets (SPEC §4): set by the operator, bound to plugins, read by a bound
plugin's run as a file. In Redis each value is encrypted (Fernet: AES-CBC with an HMAC)
with a key kept in the run directory (0600; a worker host's bundle carries it), so
neither the wire nor the AOF holds it in clear. Nothing here ever returns a value but
`values_for`, which the worker calls for one run."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from cryptography.fernet import Fernet, InvalidToken

from manager.core.errors import TitanError
from manager.core.keys import Keys

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
MAX_VALUE_BYTES = 64 * 1024


class SecretError(TitanError):
    """A secret that cannot be set or read; the message names it and the fix."""

    code = "invalid_secret"


class SecretNotFound(SecretError):
    code = "secret_not_found"


@dataclass(frozen=True)
class SecretInfo:
    """What anyone may know of a secret: never its value."""

    name: str
    size: int
    plugins: tuple[str, ...]
    changed_at: float

    def public(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size, "plugins": list(self.plugins),
                "changed_at": self.changed_at}


def load_key(path: Path, create: bool = False) -> bytes:
    """The encryption key; made (0600) when `create` and missing."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        if not create:
            raise SecretError(f"no secrets key at {path}: secrets are set on the manager's "
                              "host (make up makes the key; a worker host's bundle carries "
                              "it)") from None
    key = Fernet.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    return key


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise SecretError(f"secret name {name!r} must match [a-z][a-z0-9_]{{0,63}}")
    return name


class SecretStore:
    def __init__(self, conn: redis.Redis, keys: Keys, key_path: Path) -> None:
        self.conn = conn
        self.key = keys.secrets
        self.key_path = key_path

    def _fernet(self, create: bool = False) -> Fernet:
        return Fernet(load_key(self.key_path, create))

    def set(self, name: str, value: bytes, plugins: tuple[str, ...]) -> SecretInfo:
        """Sets (or rotates) a secret and the plugins it is bound to."""
        check_name(name)
        if not value:
            raise SecretError(f"secret {name!r}: the value is empty")
        if len(value) > MAX_VALUE_BYTES:
            raise SecretError(f"secret {name!r}: {len(value)} bytes, over {MAX_VALUE_BYTES}")
        if not plugins:
            raise SecretError(f"secret {name!r}: bind it to at least one plugin (--plugin)")
        info = SecretInfo(name, len(value), tuple(sorted(set(plugins))), time.time())
        token = self._fernet(create=True).encrypt(value).decode()
        self.conn.hset(self.key, name, json.dumps({**info.public(), "token": token}))
        return info

    def remove(self, name: str) -> bool:
        return bool(self.conn.hdel(self.key, check_name(name)))

    def list(self) -> list[SecretInfo]:
        found = []
        for raw in self.conn.hvals(self.key):
            item = json.loads(raw)
            found.append(SecretInfo(item["name"], item["size"], tuple(item["plugins"]),
                                    item["changed_at"]))
        return sorted(found, key=lambda s: s.name)

    def unbound(self, plugin: str, names: tuple[str, ...]) -> list[str]:
        """The names a plugin asks for that are not set or not bound to it."""
        if not names:
            return []
        raws = self.conn.hmget(self.key, list(names))
        return [n for n, raw in zip(names, raws, strict=True)
                if raw is None or plugin not in json.loads(raw)["plugins"]]

    def values_for(self, plugin: str, names: tuple[str, ...]) -> list[tuple[str, bytes]]:
        """The values of a run's secrets; raises SecretError naming the first that is not
        set or not bound to the plugin, with the command that fixes it."""
        if not names:
            return []
        fernet = self._fernet()
        values = []
        for name, raw in zip(names, self.conn.hmget(self.key, list(names)), strict=True):
            item = json.loads(raw) if raw else None
            if item is None or plugin not in item["plugins"]:
                raise SecretError(
                    f"secret {name!r} is {'not bound to' if item else 'not set for'} plugin "
                    f"{plugin!r}: titan-plugins.py secret set {name} --plugin {plugin}")
            try:
                values.append((name, fernet.decrypt(item["token"].encode())))
            except InvalidToken:
                raise SecretError(f"secret {name!r} does not decrypt with {self.key_path}: "
                                  "set it again with this host's key") from None
        return values
