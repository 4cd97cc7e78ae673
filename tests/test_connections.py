"""Connections that never finish their request's headers are closed (a real server, real sockets)."""

from __future__ import annotations

import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import real_server, wait_ready

STALLED_AFTER_S = 5.0  # uvicorn's keep-alive timeout, which the header deadline shares


@pytest.fixture(scope="module")
def server(seeded_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    log = tmp_path_factory.mktemp("connections") / "server.log"
    with real_server(log, weights=str(seeded_weights), allow_download="false", device="cpu") as (url, process):
        wait_ready(url, process)
        yield url, process


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes the connection (reading nothing but the end)."""
    start = time.monotonic()
    assert sock.recv(1024) == b""
    return time.monotonic() - start


def test_a_connection_whose_headers_never_arrive_is_closed_in_time(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = server
    silent, partial, after_a_request = connect(url), connect(url), connect(url)
    partial.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
    after_a_request.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert after_a_request.recv(4096).startswith(b"HTTP/1.1 200")
    after_a_request.sendall(b"GET /health/live HTTP/1.1\r\n")  # then nothing: not idle, not a request
    for sock in (silent, partial, after_a_request):
        assert closed_after(sock) < STALLED_AFTER_S + 3
        sock.close()


def test_headers_that_arrive_slowly_but_in_time_are_served(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = server
    with connect(url) as sock:
        for piece in (b"GET /health/live HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(1)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


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
