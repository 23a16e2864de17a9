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

    @staticmethod
    def _digest(token: str | None) -> str | None:
        """What Redis knows a cookie's token by; None for no token, or one no session
        could have (it is never looked up)."""
        if not token or len(token) > 100:
            return None
        return hashlib.sha256(token.encode()).hexdigest()

    def open(self, api_key: str) -> str:
        """A new session; returns the cookie's token."""
        token = secrets.token_urlsafe(32)
        session = ConsoleSession(secrets.token_urlsafe(32), fingerprint(api_key), time.time())
        self.conn.set(self.keys.console_session(self._digest(token) or ""),
                      json.dumps(asdict(session)), ex=TTL_S)
        return token

    def find(self, token: str | None, api_key: str) -> ConsoleSession | None:
        """The session this token opened, while it lasts and the key is unchanged."""
        digest = self._digest(token)
        raw = self.conn.get(self.keys.console_session(digest)) if digest else None
        if raw is None:
            return None
        session = ConsoleSession(**json.loads(raw))
        return session if hmac.compare_digest(session.key, fingerprint(api_key)) else None

    def close(self, token: str | None) -> None:
        if digest := self._digest(token):
            self.conn.delete(self.keys.console_session(digest),
                             self.keys.console_messages(digest))

    def tell(self, token: str | None, category: str, text: str) -> None:
        """A message for the session's next page (after an action's redirect)."""
        if digest := self._digest(token):
            pipe = self.conn.pipeline()
            pipe.rpush(self.keys.console_messages(digest), json.dumps([category, text]))
            pipe.expire(self.keys.console_messages(digest), 300)
            pipe.execute()

    def told(self, token: str | None) -> list[tuple[str, str]]:
        """The session's messages, each shown once."""
        digest = self._digest(token)
        if digest is None:
            return []
        pipe = self.conn.pipeline()
        pipe.lrange(self.keys.console_messages(digest), 0, 20)
        pipe.delete(self.keys.console_messages(digest))
        return [tuple(json.loads(m)) for m in pipe.execute()[0]]
