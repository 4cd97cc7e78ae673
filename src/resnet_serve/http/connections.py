"""The HTTP connections the server runs: uvicorn's httptools protocol, with a deadline on each
request's headers.

uvicorn closes a connection left idle after a response (its keep-alive timeout, 5 s), but not one
that opens and sends nothing, or sends part of a request's headers and stops: that connection
stays open for ever, and a thousand of them from one client with no bandwidth to speak of
("slowloris") use up the process's file descriptors, so real requests fail. Here a request's
headers must be complete within the same timeout, counted from the connection's start or from
the request's first byte; past it the connection is closed. A body that arrives slowly is the
request deadline's business (408), not this one's.

Concurrency: everything here runs on the event loop thread, in the protocol's callbacks.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderDeadline(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes a connection whose request headers are late."""

    _headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

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
            self._headers_due = self.loop.call_later(self.timeout_keep_alive, self._headers_late)

    def _stop_waiting(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_late(self) -> None:
        self._headers_due = None
        if not self.transport.is_closing():
            self.transport.close()
