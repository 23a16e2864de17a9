"""The TCP ports (the API's, and the metrics'): one asyncio loop in front of a waitress
server on a private unix socket, so that no account can hold them.

waitress takes a thread only for a whole request, but a client that sends its head or
body slowly holds one of its connections for as long as it keeps sending, and a
thousand such clients held every connection (issue 44: `/health` timed out). Here a
connection costs a descriptor until its request is whole, and:

- a request's head must arrive within `api_header_timeout_s` (408 otherwise; 431 past
  64 KiB), its body (by Content-Length: a chunked upload is refused, 411) within
  `api_body_timeout_s` of the head;
- one connection carries one request: its head goes on with `Connection: close`, so a
  kept-alive connection can never trickle a second one in;
- one peer holds at most `api_peer_connections` connections (429 beyond). On loopback the
  peer is the local account the kernel says owns the client's socket (sock_diag),
  whatever address or port it uses (root, the host's own, is not capped); any other peer
  is its address;
- at most `api_connection_limit` requests are with waitress at once.

TLS (TITAN_API_TLS=1) ends here too; a handshake counts against the head's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from manager.core.groups import ApiSettings

log = logging.getLogger("titan.api.front")
CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024
ROOT_PEER = "uid 0"  # the host's own: what the threat model protects, never capped
RESPONSE_LIMIT_S = 660  # the longest answer (a 600 s ?wait) and then some
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection"}
REASONS = {400: "Bad Request", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 429: "Too Many Requests",
           431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, NLMSG_ERROR = 20, 1, 2
NOCOOKIE = 0xFFFFFFFF
DIAG_REQUEST = struct.Struct("=IHHII BBBBI HH16s16sI II")  # nlmsghdr + inet_diag_req_v2
DIAG_UID = struct.Struct("=I")  # idiag_uid, 64 bytes into inet_diag_msg


def socket_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid that owns the client end of a loopback TCP connection, as the kernel
    records it: one exact sock_diag lookup of that socket (netlink, the interface `ss`
    uses; reading all of /proc/net/tcp per connection made a flood of them slow to
    accept), or None when it is not found."""
    host = ipaddress.ip_address(client[0])
    if host.version == 6 and host.ipv4_mapped:
        host = host.ipv4_mapped
    peer = ipaddress.ip_address(server[0])
    if peer.version == 6 and peer.ipv4_mapped:
        peer = peer.ipv4_mapped
    family = socket.AF_INET if host.version == 4 else socket.AF_INET6
    request = DIAG_REQUEST.pack(
        DIAG_REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0,
        family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF,
        socket.htons(client[1]), socket.htons(server[1]),
        host.packed.ljust(16, b"\0"), peer.packed.ljust(16, b"\0"), 0, NOCOOKIE, NOCOOKIE)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as diag:  # SOCK_DIAG
            diag.settimeout(1)
            diag.send(request)
            reply = diag.recv(8192)
    except OSError:
        return None
    kind = struct.unpack_from("=H", reply, 4)[0] if len(reply) >= 16 else NLMSG_ERROR
    if kind == NLMSG_ERROR or len(reply) < 16 + 64 + DIAG_UID.size:
        return None
    return DIAG_UID.unpack_from(reply, 16 + 64)[0]


def peer_of(peer: tuple, local: tuple) -> str:
    """Whom a connection is counted against: a local account, or an address."""
    host = peer[0]
    address = ipaddress.ip_address(host)
    if address.is_loopback or (address.version == 6 and address.ipv4_mapped
                               and address.ipv4_mapped.is_loopback):
        uid = socket_owner((host, peer[1]), (local[0], local[1]))
        if uid is not None:
            return f"uid {uid}"
    return f"address {host}"


@dataclass(frozen=True)
class Head:
    forwarded: bytes  # the head as waitress gets it: one request, then the connection ends
    length: int  # the body's bytes (Content-Length)

    @classmethod
    def parse(cls, raw: bytes) -> Head:
        """Raises ValueError (400) or LookupError (411) naming the problem."""
        lines = raw.decode("latin-1").split("\r\n")
        if len(lines[0].split(" ")) != 3:
            raise ValueError("the request line is not METHOD TARGET VERSION")
        kept, lengths = [lines[0]], set()
        for line in (ln for ln in lines[1:] if ln):
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError(f"a header line is malformed: {line[:60]!r}")
            low = name.lower()
            if low == "transfer-encoding":
                raise LookupError("a chunked body is not accepted: send Content-Length")
            if low == "content-length":
                lengths.add(value.strip())
            if low not in HOP_BY_HOP:
                kept.append(line)
        if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            raise ValueError("Content-Length is not one whole number")
        forwarded = "\r\n".join([*kept, "Connection: close", "", ""]).encode("latin-1")
        return cls(forwarded, int(next(iter(lengths))) if lengths else 0)


async def answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    """An error of the front's own, in the API's error shape; the connection ends."""
    body = json.dumps({"error": {"code": f"http_{status}", "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
        writer.write(head + body)
        await asyncio.wait_for(writer.drain(), 5)


class Front:
    """Serves host:port in front of `backend` (the path of a unix socket a waitress
    server listens on), on a thread of its own."""

    def __init__(self, settings: ApiSettings, backend: str, host: str, port: int,
                 context: ssl.SSLContext | None = None, name: str = "api",
                 max_body: int | None = None) -> None:
        self.settings, self.backend, self.host, self.port = settings, backend, host, port
        self.context, self.name, self.max_body = context, name, max_body
        self.loop = asyncio.new_event_loop()
        self.with_backend = asyncio.Semaphore(settings.connection_limit)
        self.peers: Counter[str] = Counter()
        self.server: asyncio.Server | None = None

    def start(self) -> None:
        """Listens before returning (a bind error is raised here), then serves."""
        self.server = self.loop.run_until_complete(asyncio.start_server(
            self._connection, self.host, self.port, ssl=self.context, limit=MAX_HEAD,
            ssl_handshake_timeout=self.settings.header_timeout_s if self.context
            else None, reuse_address=True, backlog=1024))
        threading.Thread(target=self.loop.run_forever, name=f"{self.name}-front",
                         daemon=True).start()

    def stop(self) -> None:
        """Stops listening, ends the connections in progress (their tasks cancelled and
        awaited, so none is left with an exception nobody read), then the loop."""
        if self.loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                done.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("peername"), writer.get_extra_info("sockname"))
        try:
            if peer != ROOT_PEER and self.peers[peer] >= self.settings.peer_connections:
                await answer(writer, 429, f"{peer} holds {self.peers[peer]} connections, "
                             "the most one peer may (TITAN_API_PEER_CONNECTIONS)")
                return
            self.peers[peer] += 1
            try:
                await self._serve(reader, writer)
            finally:
                self.peers[peer] -= 1
                if not self.peers[peer]:
                    del self.peers[peer]
        finally:
            with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), s.header_timeout_s)
            head = Head.parse(raw)
        except TimeoutError:
            return await answer(writer, 408, f"the request's head took over "
                                f"{s.header_timeout_s} s (TITAN_API_HEADER_TIMEOUT_S)")
        except asyncio.LimitOverrunError:
            return await answer(writer, 431, f"the request's head is over {MAX_HEAD} bytes")
        except ValueError as exc:
            return await answer(writer, 400, str(exc))
        except LookupError as exc:
            return await answer(writer, 411, exc.args[0])
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError):
            return None  # the peer went away
        if self.max_body is not None and head.length > self.max_body:
            # refused here: waitress answers 413 too, but closes with the body's first
            # bytes unread, which resets this end of the socket, and asyncio's reader
            # raises that reset before the answer it holds (2 answers in 100 were lost)
            return await answer(writer, 413, f"the request's body ({head.length} bytes) is "
                                f"over the {self.max_body} this server takes")
        async with self.with_backend:
            await self._pass(reader, writer, head)

    async def _pass(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    head: Head) -> None:
        try:
            b_reader, b_writer = await asyncio.open_unix_connection(self.backend)
        except OSError as exc:
            log.warning("the %s's backend is unreachable: %s", self.name, exc)
            return await answer(writer, 503, "the server behind this port is not answering")
        try:
            b_writer.write(head.forwarded)
            back = asyncio.create_task(self._pipe(b_reader, writer))
            try:
                await asyncio.wait_for(self._body(reader, b_writer, head.length),
                                       self.settings.body_timeout_s)
            except TimeoutError:
                back.cancel()
                return await answer(writer, 408, "the request's body took over "
                                    f"{self.settings.body_timeout_s} s "
                                    "(TITAN_API_BODY_TIMEOUT_S)")
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                pass  # waitress answered early (413) or the client left: its answer goes on
            await asyncio.wait_for(back, RESPONSE_LIMIT_S)  # ?wait asks up to 600 s
        except TimeoutError:
            back.cancel()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                b_writer.close()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    length: int) -> None:
        await dst.drain()
        while length > 0:
            data = await reader.read(min(CHUNK, length))
            if not data:
                raise asyncio.IncompleteReadError(b"", length)
            dst.write(data)
            await dst.drain()
            length -= len(data)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """The response, until waitress ends the connection (Connection: close)."""
        with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()

