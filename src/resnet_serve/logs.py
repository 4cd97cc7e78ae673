"""Logging for the ``resnet_serve`` loggers: plain or JSON lines, each carrying the request ID.

The ID lives in a context variable while a request runs (set by ``http.middleware``), so every
record logged on its behalf names it; records outside a request say ``-``.
"""

from __future__ import annotations

import contextvars
import json
import logging

from resnet_serve.settings import LogFormat

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# uvicorn.error's records reach "uvicorn"'s handlers; uvicorn.access is routed only while uvicorn's
# access log is on (the CLI turns it off: resnet_serve.access logs each request, with its ID).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.access")


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
    """Give the ``resnet_serve`` loggers one handler (also in each uvicorn worker process).

    In JSON, uvicorn's own lines (start-up, a start that failed, a broken request) go through the
    same handler, so a log collector gets nothing but JSON. Called after uvicorn has set up its
    loggers (the app factory runs after that, in each worker), it replaces their handlers only,
    never their levels."""
    root = logging.getLogger("resnet_serve")
    if getattr(root, "_resnet_serve_configured", None) != (log_format, level):
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
    if log_format == "json":
        for name in UVICORN_LOGGERS:
            uvicorn_logger = logging.getLogger(name)
            if name == "uvicorn.access" and not uvicorn_logger.handlers:
                continue  # off: giving it a handler would turn it on, one more line per request
            uvicorn_logger.handlers = list(root.handlers)
            uvicorn_logger.propagate = False
