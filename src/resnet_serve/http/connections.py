"""The HTTP connections the server runs: uvicorn's httptools protocol, with limits on each
request's headers, in time and in size.

uvicorn closes a connection left idle after a response (its keep-alive timeout, 5 s), but not one
that opens and sends nothing, or sends part of a request's headers and stops: that connection
stays open for ever, and a thousand of them from one client with no bandwidth to speak of
("slowloris") use up the process's file descriptors, so real requests fail. Nor does it bound the
headers' size: httptools buffers a header of any length, so a client can make the server hold
gigabytes for one request. Here a request's headers must be complete within the keep-alive
timeout, counted from the connection's start or from the request's first byte, or the connection
is closed; and within ``MAX_HEADER_BYTES``, or the request is answered 431 and the connection
closed. Both are counted (``resnet_serve_connections_closed_total{reason}``). A body that arrives
slowly is the request deadline's business (408), a large one the upload limit's (413).

Concurrency: everything here runs on the event loop thread, in the protocol's callbacks.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from resnet_serve.errors import HeadersTooLarge
from resnet_serve.metrics import CONNECTIONS_CLOSED

# The request line and headers together: browsers send a few kB (cookies included); nginx allows
# 32 kB by default, Node.js 16 kB.
MAX_HEADER_BYTES = 64 * 1024
_TOO_LARGE = HeadersTooLarge(f"the request line and headers exceed {MAX_HEADER_BYTES // 1024} kB")
_TOO_LARGE_ANSWER = json.dumps({"error": {"code": _TOO_LARGE.code, "message": _TOO_LARGE.message}}).encode()


class HeaderLimits(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes a connection whose request headers are late or too large."""

    _headers_due: asyncio.TimerHandle | None = None  # armed while a request's headers are awaited
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        awaiting = self._headers_due is not None
        super().data_received(data)
        if awaiting and self._headers_due is not None:  # still no complete headers after this data
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._stop_waiting()
                self.transport.write(
                    b"HTTP/1.1 %d Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (_TOO_LARGE.status_code, len(_TOO_LARGE_ANSWER), _TOO_LARGE_ANSWER))
                self.transport.close()
                CONNECTIONS_CLOSED.labels("headers_too_large").inc()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._headers_due is None:
            self._header_bytes = 0
            self._headers_due = self.loop.call_later(self.timeout_keep_alive, self._headers_late)

    def _stop_waiting(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_late(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing():
            self.transport.close()
            CONNECTIONS_CLOSED.labels("headers_late").inc()
