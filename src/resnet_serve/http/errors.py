"""Errors become HTTP responses here, once: one handler per exception class, found by Starlette
along the class's MRO (so ``ServeError`` covers the whole family).

Our routes answer ``{"error": {"code", "message"}}``. The Open Inference Protocol's routes
answer in its own shape, ``{"error": "<message>"}``: they run under ``OipRoute``, which renders
their errors before they reach these handlers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from resnet_serve.errors import ServeError

logger = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def allowed_methods(methods: set[str]) -> str:
    """A 405's ``Allow``: HEAD is answered wherever GET is (``middleware.HeadAsGet``)."""
    return ", ".join(sorted(methods | {"HEAD"} if "GET" in methods else methods))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def log_server_side(request: Request, exc: ServeError) -> None:
    if exc.status_code >= 500:
        logger.warning("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc.message)


async def serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    log_server_side(request, exc)
    return error_response(exc.status_code, exc.code, exc.message, exc.headers)


async def invalid_parameter(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_parameter", validation_message(exc))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if "Allow" in headers:
        headers["Allow"] = allowed_methods({m.strip() for m in headers["Allow"].split(",")})
    return error_response(exc.status_code, code, str(exc.detail), headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "an internal error occurred")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(RequestValidationError, invalid_parameter)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


class OipRoute(APIRoute):
    """A route whose errors answer in the Open Inference Protocol's shape, ``{"error": "..."}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServeError as exc:
                log_server_side(request, exc)
                return JSONResponse({"error": exc.message}, exc.status_code, headers=exc.headers)
            except RequestValidationError as exc:
                return JSONResponse({"error": validation_message(exc)}, 400)

        return protocol_errors
