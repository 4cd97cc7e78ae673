"""Request IDs and log lines: JSON logs carry the request ID and the request's fields; HEAD is
answered wherever GET is; start-up errors an operator can fix are one line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.types import Message

from resnet_serve.errors import RepositoryError, WeightsError
from resnet_serve.http.middleware import StartupErrors
from resnet_serve.logs import REQUEST_ID, UVICORN_LOGGERS, configure_logging


@pytest.fixture
def json_logs() -> io.StringIO:
    uvicorn_handlers = {name: logging.getLogger(name).handlers for name in UVICORN_LOGGERS}
    configure_logging("json", "info")
    stream = io.StringIO()
    handler = logging.getLogger("resnet_serve").handlers[0]
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    yield stream
    handler.setStream(previous)  # type: ignore[attr-defined]
    configure_logging("plain", "info")
    for name, handlers in uvicorn_handlers.items():
        logging.getLogger(name).handlers = handlers


async def test_json_log_lines_carry_the_request_and_its_id(client: httpx.AsyncClient, json_logs: io.StringIO) -> None:
    await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    access = next(line for line in lines if line["logger"] == "resnet_serve.access")
    assert access["request_id"] == "abc-123"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/health/live", 200)
    assert access["latency_ms"] >= 0 and access["level"] == "INFO"


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/", "/docs", "/labels", "/v2/health/ready",
                                  "/v2/models/resnet18"])
async def test_head_answers_as_get_without_the_body(client: httpx.AsyncClient, path: str) -> None:
    get, head = await client.get(path), await client.head(path)
    assert (head.status_code, get.status_code) == (200, 200)
    assert head.content == b"" and get.content
    for header in ("content-type", "content-length"):
        assert head.headers[header] == get.headers[header]
    assert head.headers["x-request-id"] != get.headers["x-request-id"]


async def test_head_is_refused_where_get_is(client: httpx.AsyncClient) -> None:
    refused = await client.head("/predict")
    assert refused.status_code == 405 and refused.headers["allow"] == "POST" and refused.content == b""


@pytest.mark.parametrize("path", ["/health/live", "/v2/health/live"])
async def test_a_405_on_a_get_path_names_head_too(client: httpx.AsyncClient, path: str) -> None:
    refused = await client.delete(path)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"


def test_records_outside_a_request_say_so(json_logs: io.StringIO) -> None:
    assert REQUEST_ID.get() == "-"
    logging.getLogger("resnet_serve.test").warning("plain message")
    (line,) = [json.loads(x) for x in json_logs.getvalue().splitlines()]
    assert line == {**line, "message": "plain message", "request_id": "-", "level": "WARNING"}


def test_in_json_uvicorn_s_own_lines_are_json_too(json_logs: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").error("Application startup failed. Exiting.")
    (line,) = [json.loads(x) for x in json_logs.getvalue().splitlines()]
    assert line == {**line, "logger": "uvicorn.error", "message": "Application startup failed. Exiting.", "level": "ERROR"}


@pytest.mark.parametrize("access_log", [False, True])
def test_in_json_uvicorn_s_access_log_stays_as_uvicorn_set_it(json_logs: io.StringIO, access_log: bool) -> None:
    """The CLI turns uvicorn's access log off (resnet_serve.access logs each request, with its ID):
    routing uvicorn's loggers to JSON must not turn it back on, a second line per request."""
    uvicorn.Config(Starlette(), access_log=access_log)  # configures uvicorn's loggers, as a server does
    configure_logging("json", "info")
    logging.getLogger("uvicorn.access").info("GET / 200")
    assert [json.loads(x)["logger"] for x in json_logs.getvalue().splitlines()] == ["uvicorn.access"] * access_log


async def _start(error: BaseException) -> tuple[list[Message], BaseException | None]:
    """Drive an app whose start raises ``error`` through the ASGI lifespan, as uvicorn does."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise error
        yield

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await StartupErrors(Starlette(lifespan=lifespan))({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    except BaseException as exc:  # noqa: BLE001 - what reaches the server
        return sent, exc
    return sent, None


@pytest.mark.parametrize("error", [RepositoryError("RESNET_SERVE_MODEL_REPOSITORY=x is not a folder"),
                                   WeightsError("no resnet18-f37072fd.pth in weights")])
async def test_a_start_up_error_the_operator_can_fix_is_reported_in_one_line(error: Exception) -> None:
    sent, raised = await _start(error)
    assert raised is error
    assert sent == [{"type": "lifespan.startup.failed", "message": f"cannot start: {error}"}]


async def test_any_other_start_up_failure_keeps_its_traceback() -> None:
    sent, raised = await _start(KeyError("a fault of ours"))
    assert isinstance(raised, KeyError)
    ((message,),) = [[m for m in sent if m["type"] == "lifespan.startup.failed"]]
    assert message["message"].startswith("Traceback") and "KeyError: 'a fault of ours'" in message["message"]
