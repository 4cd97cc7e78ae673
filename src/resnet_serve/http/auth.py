"""The optional API key (``RESNET_SERVE_API_KEY``) on the prediction routes; health stays open."""

from __future__ import annotations

import hmac

from fastapi import Request

from resnet_serve.errors import Unauthorized
from resnet_serve.http.dependencies import ServiceDep


async def require_api_key(request: Request, service: ServiceDep) -> None:
    """Check ``Authorization: Bearer`` or ``X-API-Key`` in constant time.

    It is ``async`` only so that FastAPI runs it on the event loop: a plain function dependency
    is sent to a worker thread, a thread hop on every request for a few microseconds of work."""
    key = service.settings.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key", "")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        given = token.strip()
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized("missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
