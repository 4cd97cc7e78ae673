"""Property-based fuzzing of the upload path (hypothesis) and of the API contract (schemathesis)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.requests import Request

from resnet_serve.errors import ServeError
from resnet_serve.http.uploads import read_upload
from resnet_serve.spec import RESNET18
from resnet_serve.transform import preprocess
from tests.conftest import SKIMAGE_DATA, as_jpeg, encode, real_server, wait_ready

LIMIT = 50_000_000
SCHEMATHESIS_CONFIG = Path(__file__).parent / "schemathesis.toml"
_photo = Image.open(SKIMAGE_DATA / "coffee.png").convert("RGB").resize((160, 120))
SEEDS = [as_jpeg(_photo), encode(_photo, "PNG"), encode(_photo, "GIF"), encode(_photo, "WEBP"),
         encode(_photo, "BMP"), encode(_photo, "TIFF"), encode(_photo, "AVIF"),
         encode(_photo, "HEIF")]


def outcome(data: bytes) -> int:
    """200 or the status of the ServeError; anything else escapes and fails the test."""
    try:
        result = preprocess(data, RESNET18, max_pixels=LIMIT)
    except ServeError as exc:
        return exc.status_code
    assert result.pixels.shape == (3, 224, 224)
    return 200


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    assert outcome(data) in {200, 400, 413, 415}


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real encoded image with some bytes flipped, some cut, or junk appended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=12)):
        data[position] = value
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images())
def test_damaged_real_images_get_a_client_error_or_a_result(data: bytes) -> None:
    assert outcome(data) in {200, 400, 413, 415}


def request_with(body: bytes, content_type: bytes | None) -> Request:
    headers = [(b"content-type", content_type)] if content_type is not None else []
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b""}
    return Request(scope, receive)  # type: ignore[arg-type]


CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from([b"multipart/form-data; boundary=xyz", b"multipart/form-data", b"image/jpeg",
                     b"application/octet-stream", b"text/plain", b"multipart/form-data; boundary="]),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.tuples(st.sampled_from(["file", "other", ""]), st.binary(max_size=64)), max_size=3))
    body = b"".join(
        b"--xyz\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"; filename=\"a\"\r\n\r\n"
        + payload + b"\r\n" for name, payload in parts
    )
    return body + draw(st.sampled_from([b"--xyz--\r\n", b"", b"--xy"]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=512), multipart_bodies()), CONTENT_TYPES)
def test_the_body_reader_answers_every_request_with_data_or_a_client_error(body: bytes, content_type: bytes | None) -> None:
    try:
        upload = asyncio.run(read_upload(request_with(body, content_type), max_bytes=1024))
    except ServeError as exc:
        assert 400 <= exc.status_code < 500
    else:  # an empty multipart file part is allowed here: the decoder answers it with 400
        assert isinstance(upload.data, bytes) and len(upload.data) <= 1024
        assert upload.data or (content_type or b"").startswith(b"multipart/")


def test_the_api_honours_its_own_openapi_schema(seeded_weights: Path, tmp_path: Path) -> None:
    """schemathesis against a real server: no 5xx; status codes, content types, headers and
    bodies as the schema documents them (all checks; see tests/schemathesis.toml)."""
    with real_server(tmp_path / "server.log", weights=str(seeded_weights), allow_download="false",
                     device="cpu") as (url, process):
        wait_ready(url, process)
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(SCHEMATHESIS_CONFIG),
             "run", f"{url}/openapi.json", "--max-examples", "50", "--seed", "1"],
            capture_output=True, text=True, timeout=600,
        )
    assert result.returncode == 0, result.stdout[-4000:]
    selected = re.search(r"(\d+) selected / (\d+) total", result.stdout)
    assert selected and selected.group(1) == selected.group(2) and int(selected.group(1)) >= 10
