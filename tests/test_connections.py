"""Request headers that never finish, or never end, close the connection (a real server, real sockets)."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from resnet_serve.http.connections import MAX_HEADER_BYTES
from tests.conftest import real_server, wait_ready

STALLED_AFTER_S = 5.0  # uvicorn's keep-alive timeout, which the header deadline shares


@pytest.fixture(scope="module")
def server(seeded_weights: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    log = tmp_path_factory.mktemp("connections") / "server.log"
    with real_server(log, weights=str(seeded_weights), allow_download="false", device="cpu") as (url, process):
        wait_ready(url, process)
        yield url, process


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def response(sock: socket.socket) -> bytes:
    """One whole response: its head, and as many body bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def closed(url: str, reason: str) -> float:
    """How many connections the server has closed for ``reason`` (its metric)."""
    line = next((x for x in httpx.get(f"{url}/metrics").text.splitlines()
                 if x.startswith(f'resnet_serve_connections_closed_total{{reason="{reason}"}}')), "_ 0")
    return float(line.rsplit(" ", 1)[1])


def closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes the connection (reading nothing but the end)."""
    start = time.monotonic()
    assert sock.recv(1024) == b""
    return time.monotonic() - start


def test_a_connection_whose_headers_never_arrive_is_closed_in_time(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = server
    before = closed(url, "headers_late")
    silent, partial, after_a_request = connect(url), connect(url), connect(url)
    partial.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
    after_a_request.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response(after_a_request).startswith(b"HTTP/1.1 200")
    after_a_request.sendall(b"GET /health/live HTTP/1.1\r\n")  # then nothing: not idle, not a request
    for sock in (silent, partial, after_a_request):
        assert closed_after(sock) < STALLED_AFTER_S + 3
        sock.close()
    assert closed(url, "headers_late") == before + 3


def test_headers_that_arrive_slowly_but_in_time_are_served(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = server
    with connect(url) as sock:
        for piece in (b"GET /health/live HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(1)
        assert response(sock).startswith(b"HTTP/1.1 200")


def test_headers_past_the_size_limit_are_refused_with_431_before_they_end(
    server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, _ = server
    cookie = b"Cookie: " + b"c" * (MAX_HEADER_BYTES // 2) + b"\r\n"  # large, as browsers can send
    with connect(url) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n")
        assert response(sock).startswith(b"HTTP/1.1 200")
    with connect(url) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (MAX_HEADER_BYTES + 4096))
        answer = response(sock)
        assert answer.startswith(b"HTTP/1.1 431 ")
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "headers_too_large" and "64 kB" in body["error"]["message"]
        assert sock.recv(4096) == b""  # and the connection is closed
    assert closed(url, "headers_too_large") == 1


def test_stalled_connections_past_the_file_limit_do_not_lock_out_real_requests(
    server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """One client opens more connections than the server may hold files and sends each the start
    of a request: once their deadline passes, the server has its descriptors back."""
    url, process = server
    resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (256, 256))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 1024), hard), hard))
    stalled = []
    try:
        for _ in range(300):
            try:
                sock = connect(url)
            except OSError:
                break  # the server's queue is full: what a real client would meet too
            sock.sendall(b"POST /predict HTTP/1.1\r\n")
            stalled.append(sock)
        assert len(stalled) > 256
        time.sleep(STALLED_AFTER_S + 2)
        assert httpx.get(f"{url}/health/live", timeout=10).status_code == 200
    finally:
        for sock in stalled:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
