"""The console's sign-in: a session per browser, kept in Redis, never in the cookie.

The cookie holds only a random token; Redis holds the session under the token's SHA-256
(a leaked keyspace dump signs nobody in), with its CSRF token and the fingerprint of the
API key it was opened with, so that rotating the key signs every browser out. Signing out
deletes the session: a copied cookie is refused afterwards too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass

import redis

from manager.core.keys import Keys

COOKIE = "titan_console"
SIGNIN_COOKIE = "titan_console_signin"  # the sign-in form's CSRF token (double submit)
TTL_S = 12 * 3600  # a session lasts a working day, then the key is asked again


def fingerprint(api_key: str) -> str:
    return hashlib.sha256(f"titan-console:{api_key}".encode()).hexdigest()[:32]


def key_matches(given: str, api_key: str) -> bool:
    """Constant-time: the time taken says nothing about how much of the key was right."""
    return hmac.compare_digest(given.encode(), api_key.encode())


@dataclass(frozen=True)
class ConsoleSession:
    csrf: str
    key: str  # the API key's fingerprint when it was opened
    opened_at: float


class Sessions:
    """Opens, finds and closes console sessions."""

    def __init__(self, conn: redis.Redis, keys: Keys) -> None:
        self.conn = conn
        self.keys = keys

    def _key(self, token: str) -> str:
        return self.keys.console_session(hashlib.sha256(token.encode()).hexdigest())

    def open(self, api_key: str) -> str:
        """A new session; returns the cookie's token."""
        token = secrets.token_urlsafe(32)
        session = ConsoleSession(secrets.token_urlsafe(32), fingerprint(api_key), time.time())
        self.conn.set(self._key(token), json.dumps(asdict(session)), ex=TTL_S)
        return token

    def find(self, token: str | None, api_key: str) -> ConsoleSession | None:
        """The session this token opened, while it lasts and the key is unchanged."""
        if not token or len(token) > 100:
            return None
        raw = self.conn.get(self._key(token))
        if raw is None:
            return None
        session = ConsoleSession(**json.loads(raw))
        return session if hmac.compare_digest(session.key, fingerprint(api_key)) else None

    def close(self, token: str | None) -> None:
        if token and len(token) <= 100:
            self.conn.delete(self._key(token), self._key(token) + ":told")

    def tell(self, token: str | None, category: str, text: str) -> None:
        """A message for the session's next page (after an action's redirect)."""
        if token and len(token) <= 100:
            key = self._key(token) + ":told"
            pipe = self.conn.pipeline()
            pipe.rpush(key, json.dumps([category, text]))
            pipe.expire(key, 300)
            pipe.execute()

    def told(self, token: str | None) -> list[tuple[str, str]]:
        """The session's messages, each shown once."""
        if not token or len(token) > 100:
            return []
        key = self._key(token) + ":told"
        pipe = self.conn.pipeline()
        pipe.lrange(key, 0, 20)
        pipe.delete(key)
        return [tuple(json.loads(m)) for m in pipe.execute()[0]]
