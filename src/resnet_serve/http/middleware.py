"""Request IDs, the one log line per request and the request metrics, as a pure ASGI middleware.

Every response carries ``X-Request-ID``: the caller's, if it is a sane token, else a new one.
Handlers add fields to the line through ``scope["state"]`` (e.g. ``batch_size``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_serve.logs import REQUEST_ID
from resnet_serve.metrics import REQUEST_SECONDS, REQUESTS, route_of

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_logger = logging.getLogger("resnet_serve.access")


class HttpMiddleware:
    """A pure ASGI middleware that acts on HTTP requests only; lifespan and websockets pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestLog(HttpMiddleware):
    """Assigns the request ID, adds the response header, logs one line when the request ends."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if _SANE_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = route_of(scope)
            REQUESTS.labels(route, scope["method"], str(status)).inc()
            REQUEST_SECONDS.labels(route).observe(seconds)
            latency_ms = round(seconds * 1000, 2)
            batch = state.get("batch_size")
            client = scope.get("client")
            access_logger.info(
                "%s %s %d %.1fms%s", scope["method"], scope["path"], status, latency_ms,
                f" batch={batch}" if batch else "",
                extra={"method": scope["method"], "path": scope["path"], "status": status,
                       "latency_ms": latency_ms, "batch_size": batch,
                       "client": f"{client[0]}:{client[1]}" if client else None},
            )
            REQUEST_ID.reset(token)
