"""Overload, deadlines, hostile input, faults, shutdown and the security knobs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from resnet_serve.http.app import create_app
from resnet_serve.inference import Engine
from resnet_serve.settings import Settings
from tests.conftest import (
    SKIMAGE_DATA,
    as_jpeg,
    encode,
    open_client,
    real_server,
    wait_ready,
)

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def png_with_header(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG that declares ``width`` x ``height`` 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def hostile_inputs() -> dict[str, tuple[bytes, str, int]]:
    """name -> (body, content type, expected status), built from a real photo."""
    photo = Image.open(SKIMAGE_DATA / "chelsea.png").convert("RGB")
    jpeg = as_jpeg(photo)
    png = encode(photo, "PNG")
    avif = encode(photo, "AVIF")
    dht = jpeg.index(b"\xff\xc4")
    bad_huffman = jpeg[: dht + 5] + b"\xff" * 16 + jpeg[dht + 21 :]
    idat = png.index(b"IDAT")
    (idat_length,) = struct.unpack(">I", png[idat - 4 : idat])
    crc_at = idat + 4 + idat_length
    bad_crc = png[:crc_at] + bytes([png[crc_at] ^ 0xFF]) + png[crc_at + 1 :]
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = Image.fromarray(np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1)))
    return {
        "zero bytes": (b"", "image/jpeg", 400),
        "random bytes": (np.random.default_rng(0).bytes(5000), "image/jpeg", 415),
        "text renamed .jpg": (b"Dear diary, today I renamed a text file.", "image/jpeg", 415),
        "truncated JPEG": (jpeg[: len(jpeg) // 2], "image/jpeg", 400),
        "truncated PNG": (png[: len(png) // 2], "image/png", 400),
        "JPEG with a corrupt Huffman table": (bad_huffman, "image/jpeg", 400),
        "PNG with a bad CRC": (bad_crc, "image/png", 400),
        "truncated AVIF": (avif[: len(avif) * 2 // 3], "image/avif", 400),
        "huge AVIF, small file": (encode(Image.new("RGB", (9000, 7000)), "AVIF", speed=10), "image/avif", 413),
        "decompression bomb 30000x30000 PNG": (png_with_header(30000, 30000), "image/png", 413),
        "huge dimensions, small file": (png_with_header(12000, 5000), "image/png", 413),
        "animated GIF": (gif.getvalue(), "image/gif", 200),
        "CMYK JPEG": (encode(photo.convert("CMYK"), "JPEG"), "image/jpeg", 200),
        "16-bit PNG": (encode(sixteen, "PNG"), "image/png", 200),
        "1x1 pixel": (encode(Image.new("RGB", (1, 1)), "PNG"), "image/png", 200),
        "EXIF rotation": (as_jpeg(photo, exif=exif.tobytes()), "image/jpeg", 200),
        "just over 10 MB": (b"\xff\xd8\xff" + bytes(10 * 1024 * 1024), "image/jpeg", 413),
        "wrong Content-Type": (jpeg, "text/plain", 415),
    }


HOSTILE = hostile_inputs()


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_and_broken_uploads_get_clear_answers(client: httpx.AsyncClient, name: str) -> None:
    body, content_type, expected = HOSTILE[name]
    if content_type == "text/plain":  # the whole body, not a multipart part, is mislabelled
        response = await client.post("/predict", content=body, headers={"content-type": content_type})
    else:
        response = await client.post("/predict", files={"file": ("upload", body, content_type)})
    assert response.status_code == expected, response.text
    if expected != 200:
        error = response.json()["error"]
        assert error["code"] and error["message"] and "Traceback" not in response.text


async def test_missing_content_type_is_read_as_the_raw_image(client: httpx.AsyncClient) -> None:
    jpeg = HOSTILE["EXIF rotation"][0]
    request = client.build_request("POST", "/predict", content=jpeg)
    assert "content-type" not in request.headers
    response = await client.send(request)
    assert response.status_code == 200 and response.json()["image"]["width"] == 300


# --- security --------------------------------------------------------------------------------


@pytest.fixture
async def locked_client(settings: Settings, engine: Engine) -> Any:
    locked = settings.model_copy(update={"api_key": SecretStr("correct horse battery staple")})
    async for c in open_client(create_app(locked, engine=engine)):
        yield c


async def test_the_api_key_protects_predictions_but_not_health(locked_client: httpx.AsyncClient) -> None:
    jpeg = HOSTILE["EXIF rotation"][0]
    files = {"file": ("a.jpg", jpeg, "image/jpeg")}
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = await locked_client.post("/predict", files=files, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": {"code": "unauthorized", "message": "missing or invalid API key"}}
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for headers in ({"X-API-Key": "correct horse battery staple"},
                    {"Authorization": "Bearer correct horse battery staple"}):
        assert (await locked_client.post("/predict", files=files, headers=headers)).status_code == 200
    assert (await locked_client.get("/health/ready")).status_code == 200
    assert (await locked_client.get("/health/live")).status_code == 200


async def test_cors_is_off_by_default_and_configurable(client: httpx.AsyncClient, settings: Settings, engine: Engine) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in (await client.options("/predict", headers=preflight)).headers
    opened = settings.model_copy(update={"cors_origins": ["https://app.example"]})
    async for c in open_client(create_app(opened, engine=engine)):
        response = await c.options("/predict", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = await c.options("/predict", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_request_ids_are_generated_or_propagated_and_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    jpeg = HOSTILE["EXIF rotation"][0]
    with caplog.at_level(logging.INFO, logger="resnet_serve.access"):
        mine = await client.post("/predict", files={"file": ("a.jpg", jpeg, "image/jpeg")},
                                 headers={"X-Request-ID": "trace-42"})
        generated = await client.get("/health/live")
        hostile = await client.get("/health/live", headers={"X-Request-ID": "x" * 500})
    assert mine.headers["X-Request-ID"] == "trace-42"
    assert len(generated.headers["X-Request-ID"]) == 32
    assert hostile.headers["X-Request-ID"] != "x" * 500
    line = next(r for r in caplog.records if getattr(r, "request_id", None) == "trace-42")
    assert (line.method, line.path, line.status, line.batch_size) == ("POST", "/predict", 200, 1)


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    """Start from the default SIGTERM action (other libraries, e.g. Ray, install their own)."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


async def test_sigterm_flips_readiness_at_once_and_refuses_new_work(
    settings: Settings, engine: Engine, default_sigterm: None
) -> None:
    async for c in open_client(create_app(settings, engine=engine)):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN)
        handler(signal.SIGTERM, None)  # what the kernel would call; the default action is not chained
        ready = await c.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
        refused = await c.post("/predict", files={"file": ("a.jpg", HOSTILE["EXIF rotation"][0], "image/jpeg")})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    assert signal.getsignal(signal.SIGTERM) is not handler  # restored at shutdown


async def test_sigterm_during_a_write_to_the_log_still_reaches_uvicorn(
    settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal can arrive while the main thread is writing a log line to stderr. Seen in a
    container: the handler's own log line then failed ("reentrant call inside BufferedWriter"),
    the error escaped the handler, uvicorn's handler never ran, and the server kept serving
    until it was killed. Here the signal is delivered from inside the log stream's write."""
    chained: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: chained.append(signum))  # uvicorn's, say
    delivered = False

    class RawStderr(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            nonlocal delivered
            if not delivered:
                delivered = True
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # type: ignore[operator]
            return len(data)

    stderr = io.TextIOWrapper(io.BufferedWriter(RawStderr()), write_through=True)
    try:
        async for c in open_client(create_app(settings, engine=engine)):
            monkeypatch.setattr(sys, "stderr", stderr)  # where logging reports its own failures too
            handler = logging.getLogger("resnet_serve").handlers[0]
            former = handler.setStream(stderr)  # type: ignore[attr-defined]
            try:
                await c.get("/health/live")  # its access line is the write the signal interrupts
            finally:
                handler.setStream(former)  # type: ignore[attr-defined]
                monkeypatch.undo()
            assert delivered and chained == [signal.SIGTERM]
            assert (await c.get("/health/ready")).json()["status"] == "shutting_down"
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_a_dead_inference_thread_makes_readiness_503_then_recovers(settings: Settings, engine: Engine) -> None:
    async for c in open_client(create_app(settings, engine=engine)):
        engine._thread.close(timeout=10)  # stop the thread under the engine, as if it had died
        assert not engine.alive
        probe = await c.get("/health/ready")
        assert probe.status_code == 503 and probe.json()["status"] == "restarting"
        assert (await c.get("/health/ready")).status_code == 200
        jpeg = HOSTILE["EXIF rotation"][0]
        assert (await c.post("/predict", files={"file": ("a.jpg", jpeg, "image/jpeg")})).status_code == 200


# --- a real server under load and shutdown ---------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def small_queue_server(seeded_weights: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with real_server(tmp_path / "server.log", weights=str(seeded_weights), allow_download="false",
                     max_queue="16", device="cpu", cache_size="0") as (url, process):
        wait_ready(url, process)
        yield url, process


def test_a_burst_of_500_gets_only_200s_and_503s_with_bounded_memory(
    small_queue_server: tuple[str, subprocess.Popen[bytes]], photo_jpegs: dict[str, bytes]
) -> None:
    url, process = small_queue_server
    jpeg = photo_jpegs["astronaut"]

    async def burst() -> list[int | str]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            async def one() -> int | str:
                try:
                    return (await client.post("/predict", files={"file": ("a.jpg", jpeg, "image/jpeg")})).status_code
                except httpx.HTTPError as exc:
                    return type(exc).__name__
            return await asyncio.gather(*(one() for _ in range(500)))

    asyncio.run(burst())  # first burst: let allocators and thread pools reach their working size
    before = rss_mb(process.pid)
    started = time.monotonic()
    outcomes = asyncio.run(burst())
    elapsed = time.monotonic() - started
    after = rss_mb(process.pid)
    counts = Counter(outcomes)
    report = {"requests": 500, "max_queue": 16, "statuses": {str(k): v for k, v in counts.items()},
              "seconds": round(elapsed, 2), "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "burst.json").write_text(json.dumps(report, indent=2))
    assert set(counts) <= {200, 503}, report
    assert counts[200] >= 16 and counts[503] > 0, report
    assert after - before < 100, report  # the second burst adds no lasting memory


def test_concurrent_batches_are_admitted_per_image_and_refused_cleanly(
    small_queue_server: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """Batches of eight 1 MB photos over real sockets against 20 slots: the refused ones read a
    clean 503 although their uploads were still arriving, one or two are admitted and answered in
    full (a batch refused midway gives its slots back as it is refused, so batches arriving side
    by side do not starve each other), and a batch larger than the server admits gets 413."""
    url, _ = small_queue_server
    rng = np.random.default_rng(7)

    def noise_jpeg() -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(out, "JPEG", quality=95)
        return out.getvalue()

    def batch(size: int) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("files", (f"{i}.jpg", noise_jpeg(), "image/jpeg")) for i in range(size)]

    batches = [batch(8) for _ in range(8)]
    assert len(batches[0][0][1][1]) > 500_000

    async def send_all() -> list[httpx.Response | str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(files: list[tuple[str, tuple[str, bytes, str]]]) -> httpx.Response | str:
                try:
                    return await client.post("/predict/batch", files=files)
                except httpx.HTTPError as exc:
                    return type(exc).__name__
            return await asyncio.gather(*(one(files) for files in batches))

    outcomes = asyncio.run(send_all())
    statuses = [o if isinstance(o, str) else o.status_code for o in outcomes]
    assert set(statuses) <= {200, 503} and statuses.count(200) in (1, 2), statuses
    for answer in outcomes:
        assert isinstance(answer, httpx.Response)
        if answer.status_code == 200:
            assert [item["status"] for item in answer.json()["results"]] == [200] * 8
        else:
            assert answer.json()["error"]["code"] == "overloaded" and answer.headers["Retry-After"] == "1"
    too_many = httpx.post(f"{url}/predict/batch", files=batch(21), timeout=60)
    assert too_many.status_code == 413 and "at most 20" in too_many.json()["error"]["message"]


def test_a_slow_1gb_upload_is_cut_off_at_the_limit(small_queue_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = small_queue_server
    host, port = url.removeprefix("http://").split(":")
    chunk = b"\xff" * 256 * 1024
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 1024**3:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                time.sleep(0.005)  # a slow client: about 50 MB/s at most
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 32 * 1024 * 1024  # cut off near 10 MB, not read to the end


async def all_accepted(client: httpx.AsyncClient, count: int) -> None:
    """Wait until ``count`` predictions are in flight or answered, per the server's metrics."""
    for _ in range(600):
        text = (await client.get("/metrics")).text
        values = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(("resnet_serve_in_flight{", "resnet_serve_requests_total{"))}
        done = values.get('resnet_serve_requests_total{method="POST",route="/predict",status="200"}', 0.0)
        if values.get('resnet_serve_in_flight{model="resnet18"}', 0.0) + done >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the requests never reached the server")


def test_sigterm_mid_load_finishes_every_accepted_request_and_exits_0(
    seeded_weights: Path, tmp_path: Path, photo_jpegs: dict[str, bytes]
) -> None:
    with real_server(tmp_path / "server.log", weights=str(seeded_weights), allow_download="false",
                     device="cpu") as (url, process):
        wait_ready(url, process)

        async def load() -> list[int | str]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one(name: str) -> int | str:
                    try:
                        response = await client.post("/predict", files={"file": ("a.jpg", photo_jpegs[name], "image/jpeg")})
                        return response.status_code
                    except httpx.HTTPError as exc:
                        return type(exc).__name__

                tasks = [asyncio.create_task(one(name)) for name in list(photo_jpegs) * 2]
                await all_accepted(client, len(tasks))  # every request is in the server's hands
                os.kill(process.pid, signal.SIGTERM)
                return await asyncio.gather(*tasks)

        outcomes = asyncio.run(load())
        assert outcomes == [200] * len(outcomes), outcomes
        assert process.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health/live")
    assert "shutting down" in (tmp_path / "server.log").read_text()


def test_free_heap_is_given_back_to_the_os() -> None:
    from resnet_serve.memory import release_free_heap

    big = [bytearray(8 * 1024 * 1024) for _ in range(4)]  # heap growth like large uploads
    del big
    assert release_free_heap() is True  # glibc, as on the machines this serves on
