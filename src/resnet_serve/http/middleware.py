"""Pure ASGI middleware: request IDs, the one log line per request and the request metrics;
HEAD answered wherever GET is; and start-up failures an operator can fix, told in one line.

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

from resnet_serve.errors import RepositoryError, WeightsError
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


class HeadAsGet(HttpMiddleware):
    """HEAD is answered as GET would be, headers only: HTTP asks it of every GET resource, and
    uptime monitors and ``curl -I`` probe with it, but FastAPI routes only the methods declared.
    The server drops a HEAD answer's body too; it is emptied here so no server depends on that."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class StartupErrors:
    """A start-up failure the operator can fix (a repository or weights that cannot be used) is
    logged as its message, one line, instead of Starlette's traceback through the lifespan.

    Starlette reports a failed start to the server (``lifespan.startup.failed``, the traceback as
    its text) and then raises; this holds that report until the exception arrives here, and
    shortens its text when the exception is one of those errors. Anything else, a fault of
    ours, keeps its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except (RepositoryError, WeightsError) as exc:
            held[:] = [{**message, "message": f"cannot start: {exc}"} for message in held]
            raise
        finally:
            for message in held:
                await send(message)
