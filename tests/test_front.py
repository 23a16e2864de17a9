"""The TCP front's rules as pure logic and with the kernel: a request's head is passed on
as one request that ends its connection, a chunked or ambiguous body is refused, and a
loopback peer is the account the kernel says owns its socket."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from manager.api.front import Head, peer_of, socket_owner


def test_a_head_goes_on_as_one_request_that_ends_its_connection() -> None:
    head = Head.parse(b"POST /events HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                      b"Keep-Alive: timeout=99\r\nContent-Length: 12\r\n\r\n")
    assert head.length == 12
    assert head.forwarded == (b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
                              b"Connection: close\r\n\r\n")
    assert Head.parse(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").length == 0


@pytest.mark.parametrize(("raw", "error", "says"), [
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", LookupError, "Content-Length"),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", ValueError,
     "one whole number"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", ValueError, "one whole number"),
    (b"POST / HTTP/1.1\r\n Host: x\r\n\r\n", ValueError, "malformed"),
    (b"GARBAGE\r\n\r\n", ValueError, "request line"),
])
def test_a_head_the_front_cannot_pass_on_safely_is_refused(raw: bytes, error: type,
                                                          says: str) -> None:
    with pytest.raises(error, match=says):
        Head.parse(raw)


def test_a_loopback_peer_is_the_account_that_owns_its_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = ("import socket, sys, time; s = socket.create_connection(('127.0.0.1', "
                  f"{port})); print('on', flush=True); sys.stdin.read()")
        for argv, uid in (([], 0), (["setpriv", "--reuid=65534", "--regid=65534",
                                     "--clear-groups", "--"], 65534)):
            proc = subprocess.Popen([*argv, sys.executable, "-c", client], text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None and proc.stdout.readline() == "on\n"
                conn, peer = server.accept()
                with conn:
                    assert socket_owner(peer, conn.getsockname()) == uid
                    assert peer_of(peer, conn.getsockname()) == f"uid {uid}"
            finally:
                proc.communicate("")
    assert peer_of(("192.0.2.7", 4000), ("192.0.2.1", 8003)) == "address 192.0.2.7"
