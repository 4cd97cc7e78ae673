"""Request IDs, the one log line per request and the request metrics, as a pure ASGI middleware.

Every response carries ``X-Request-ID``: the caller's, if it is a sane token, else a new one.
The ID is in a context variable while the request runs, so every log record made on its behalf
names it. Handlers add fields to the line through ``scope["state"]`` (e.g. ``batch_size``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_serve.metrics import REQUEST_SECONDS, REQUESTS, route_of
from resnet_serve.settings import LogFormat

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_logger = logging.getLogger("resnet_serve.access")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and extra fields."""

    FIELDS = ("method", "path", "status", "latency_ms", "batch_size", "client")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: LogFormat, level: str = "info") -> None:
    """Give the ``resnet_serve`` loggers one handler (also in each uvicorn worker process)."""
    root = logging.getLogger("resnet_serve")
    if getattr(root, "_resnet_serve_configured", None) == (log_format, level):
        return
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root.handlers = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    root._resnet_serve_configured = (log_format, level)  # type: ignore[attr-defined]


class RequestLog:
    """Assigns the request ID, adds the response header, logs one line when the request ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
