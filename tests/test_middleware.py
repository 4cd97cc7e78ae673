"""Request IDs and log lines: JSON logs carry the request ID and the request's fields."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest

from resnet_serve.logs import REQUEST_ID, configure_logging


@pytest.fixture
def json_logs() -> io.StringIO:
    configure_logging("json", "info")
    stream = io.StringIO()
    handler = logging.getLogger("resnet_serve").handlers[0]
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    yield stream
    handler.setStream(previous)  # type: ignore[attr-defined]
    configure_logging("plain", "info")


async def test_json_log_lines_carry_the_request_and_its_id(client: httpx.AsyncClient, json_logs: io.StringIO) -> None:
    await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    access = next(line for line in lines if line["logger"] == "resnet_serve.access")
    assert access["request_id"] == "abc-123"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/health/live", 200)
    assert access["latency_ms"] >= 0 and access["level"] == "INFO"


def test_records_outside_a_request_say_so(json_logs: io.StringIO) -> None:
    assert REQUEST_ID.get() == "-"
    logging.getLogger("resnet_serve.test").warning("plain message")
    (line,) = [json.loads(x) for x in json_logs.getvalue().splitlines()]
    assert line == {**line, "message": "plain message", "request_id": "-", "level": "WARNING"}
