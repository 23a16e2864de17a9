"""HTTPS on the API's TCP port (TITAN_API_TLS=1), with the certificate of the project's CA
(run/tls/servers/api.crt).

waitress speaks no TLS, and its limits are what keep one client from holding the API
(connection limit, channel timeout, poll). So TLS ends here, in one asyncio loop on its
own thread (an idle or half-done TLS connection costs a descriptor, never a thread; a
handshake not done within `api_channel_timeout` is dropped; at most
`api_connection_limit` connections), and each connection's bytes go to a waitress server
of their own on a private unix socket, with the same limits as the plain port, which
closes a silent connection as it would on the plain port. The API itself does not
change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from pathlib import Path

from manager.core.config import Settings

log = logging.getLogger("titan.api.https")
CHUNK = 64 * 1024


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class HttpsFront:
    """Terminates TLS on api_host:api_port and passes each connection to `backend` (the
    path of a unix socket a waitress server listens on)."""

    def __init__(self, settings: Settings, backend: str) -> None:
        self.settings, self.backend = settings, backend
        self.context = server_context(settings.api_tls_cert, settings.api_tls_key)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.slots = asyncio.Semaphore(settings.api_connection_limit)
        self.server: asyncio.Server | None = None

    def start(self) -> None:
        """Listens before returning (a bind error is raised here), then serves on a
        thread of its own."""
        self.server = self.loop.run_until_complete(asyncio.start_server(
            self._connection, self.settings.api_host, self.settings.api_port,
            ssl=self.context, ssl_handshake_timeout=self.settings.api_channel_timeout,
            limit=CHUNK))
        threading.Thread(target=self.loop.run_forever, name="api-https", daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self.slots.locked():  # at the limit: this one is closed, the others served
            writer.close()
            return
        async with self.slots:
            try:
                b_reader, b_writer = await asyncio.open_unix_connection(self.backend)
            except OSError as exc:
                log.warning("the API's HTTPS backend is unreachable: %s", exc)
                writer.close()
                return
            await asyncio.gather(self._pipe(reader, b_writer), self._pipe(b_reader, writer))

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copies until either side ends. Idleness is waitress's to judge (it sees the same
        bytes): it closes a silent connection after its channel timeout, and closing one
        side here closes the other."""
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
        except (OSError, ssl.SSLError):
            pass  # the peer went away: the connection ends, as waitress's would
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()
