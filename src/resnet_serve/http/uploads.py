"""Read the images out of an HTTP request body, in memory, never past the size limit; and the
gate every upload passes before its body is read (``admitted_upload``).

FastAPI's ``UploadFile`` spools large files to a temporary file on disk; uploads here must
never touch the disk, and an oversized body must be cut off at the limit rather than read to
the end. So the body is streamed through python-multipart's push parser (the one Starlette
uses) and the bytes of the ``file`` part are counted as they arrive.

Accepted bodies: ``multipart/form-data`` with exactly one ``file`` part (or, for a batch, up
to ``MAX_BATCH_FILES`` ``files`` parts, each taking its admission slot as it begins), or the
raw image bytes sent as ``image/*``, ``application/octet-stream`` or with no Content-Type at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from resnet_serve.errors import (
    MalformedRequest,
    MissingFile,
    PayloadTooLarge,
    ServeError,
    UnsupportedMediaType,
    UploadTimeout,
)
from resnet_serve.pipeline import Pipeline, Slots

FILE_FIELD = "file"
BATCH_FIELD = "files"
MAX_BATCH_FILES = 32
# Room for multipart boundaries, part headers and small form fields next to the file.
MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


class _FileCollector:
    """python-multipart callbacks that keep the ``field`` parts' bytes and count the rest."""

    def __init__(self, field: str, max_bytes: int, max_files: int, on_next_file: Callable[[], None] | None) -> None:
        self.field = field
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.on_next_file = on_next_file
        self.files: list[Upload] = []
        self._chunks: list[bytes] | None = None  # joined once at the end: one copy, no regrowth
        self._size = 0
        self._filename: str | None = None
        self._other_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""

    def on_part_begin(self) -> None:
        self._headers, self._chunks, self._size, self._filename = {}, None, 0, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name", b"").decode("latin-1") != self.field:
            return
        if len(self.files) >= self.max_files:
            if self.max_files == 1:
                raise MissingFile(f"send exactly one '{self.field}' part; this request has several")
            raise MissingFile(f"send at most {self.max_files} '{self.field}' parts")
        if self.files and self.on_next_file is not None:
            self.on_next_file()  # may refuse the request: a ServeError, raised through the parser
        self._chunks = []
        raw_name = options.get(b"filename")
        self._filename = raw_name.decode("utf-8", "replace") if raw_name is not None else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._chunks is None:
            self._other_bytes += end - start
            if self._other_bytes > MULTIPART_OVERHEAD:
                raise PayloadTooLarge.upload_over(self.max_bytes)
            return
        self._chunks.append(data[start:end])
        self._size += end - start
        if self._size > self.max_bytes:
            raise PayloadTooLarge.upload_over(self.max_bytes)

    def on_part_end(self) -> None:
        if self._chunks is not None:
            self.files.append(Upload(b"".join(self._chunks), self._filename))
            self._chunks = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }


async def _read_multipart(request: Request, boundary: bytes, max_bytes: int, field: str, max_files: int,
                          on_next_file: Callable[[], None] | None) -> list[Upload]:
    collector = _FileCollector(field, max_bytes, max_files, on_next_file)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise MalformedRequest(f"the multipart body is malformed ({exc})") from None
    if not collector.files:
        raise MissingFile(f"the multipart body has no '{field}' part")
    return collector.files


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """The whole body, counted as it arrives: past ``max_bytes`` the request is refused."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge.upload_over(max_bytes)
    except ClientDisconnect:
        raise MalformedRequest("the client disconnected during the upload") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_raw(request: Request, max_bytes: int) -> Upload:
    body = await read_body(request, max_bytes=max_bytes)
    if not body:
        raise MissingFile(
            f"no image: send multipart/form-data with a '{FILE_FIELD}' part, or the image bytes"
        )
    return Upload(body, None)


async def read_upload(request: Request, *, max_bytes: int) -> Upload:
    """The one uploaded image's bytes, or a ``ServeError`` that says what is wrong."""
    (upload,) = await read_uploads(request, max_bytes=max_bytes, max_files=1)
    return upload


async def read_within(request: Request, timeout_s: float, *, max_bytes: int, max_files: int = 1,
                      field: str = FILE_FIELD, on_next_file: Callable[[], None] | None = None) -> list[Upload]:
    """``read_uploads``, bounded in time: a client that sends too slowly gets 408."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_uploads(request, max_bytes=max_bytes, max_files=max_files, field=field,
                                      on_next_file=on_next_file)
    except TimeoutError:
        raise UploadTimeout("the upload did not complete within the request deadline") from None


async def read_uploads(request: Request, *, max_bytes: int, max_files: int, field: str = FILE_FIELD,
                       on_next_file: Callable[[], None] | None = None) -> list[Upload]:
    """Up to ``max_files`` images, each at most ``max_bytes``; a raw body counts as one image.
    ``on_next_file`` is called as each file part after the first begins, and may refuse it by
    raising a ``ServeError`` (a batch takes an admission slot per image as its parts arrive)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_files * (max_bytes + MULTIPART_OVERHEAD):
        raise PayloadTooLarge.upload_over(max_bytes)
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    try:
        if content_type == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise MalformedRequest("the multipart Content-Type has no boundary")
            return await _read_multipart(request, boundary, max_bytes, field, max_files, on_next_file)
        if content_type in (b"", b"application/octet-stream") or content_type.startswith(b"image/"):
            return [await _read_raw(request, max_bytes)]
    except ClientDisconnect:
        raise MalformedRequest("the client disconnected during the upload") from None
    raise UnsupportedMediaType(
        f"Content-Type {content_type.decode('latin-1')!r} is not accepted: send multipart/form-data "
        f"with a '{field}' part, or the image bytes as image/* or application/octet-stream"
    )


async def discard_body(request: Request, *, max_bytes: int) -> None:
    """Read and drop up to ``max_bytes`` of the body, so a refusal reaches the client cleanly.

    A server that answers before the upload is consumed may reset the connection under a client
    that is still sending; draining (without keeping the bytes) avoids that. Past the limit the
    connection is closed instead.
    """
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_bytes:
                return
    except ClientDisconnect:
        return


async def refused_upload(request: Request, refusal: ServeError, *, max_bytes: int) -> ServeError:
    """``refusal``, ready to raise before the body is read. A client that sent ``Expect:
    100-continue`` (curl does for uploads over 1 MB) waits for leave to send its body: it never
    gets it, and as the promised body stays unread the connection is closed after the answer.
    Any other client's body is drained, without being kept, so it reads the answer rather than
    a reset connection."""
    if request.headers.get("expect", "").lower() == "100-continue":
        refusal.headers["Connection"] = "close"
    else:
        await discard_body(request, max_bytes=max_bytes)
    return refusal


@contextlib.asynccontextmanager
async def admitted_upload(request: Request, pipeline: Pipeline, *, max_bytes: int) -> AsyncIterator[Slots]:
    """The gate of an upload route, before anything is read: a slot for the first image, or a
    503 at once (``refused_upload``); further images take theirs as they are found
    (``Slots.take``)."""
    if not pipeline.has_room():
        raise await refused_upload(request, pipeline.overloaded(), max_bytes=max_bytes)
    with pipeline.admitted() as slots:
        yield slots


async def client_gone(request: Request) -> None:
    """Return once the client disconnects (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
