"""Classifying many files: paths in, one row per input out, streamed in constant memory.

Inputs (``find_inputs``): files as given; folders, recursively, keeping the files whose name or
first bytes say image; glob patterns; ``-`` for paths read from stdin. Every input gets a row:
one that cannot be read or decoded gets a row with its error, and the run goes on. An input
that is not a regular file (a FIFO, a device) or is larger than the upload limit is refused
before it is read (``read_input``), as it would block, never end, or fill the memory.

Paths are the file system's bytes: a name that is not UTF-8 is kept as Python's
``surrogateescape`` gives it, written to CSV and JSON Lines as the same bytes (so ``--resume``
finds it again), and shown escaped (``\\xff``) on a terminal.

Concurrency: one event loop. At most ``window`` inputs are in flight at once (read, predict,
wait to be written), so memory does not grow with the number of inputs. Offline, each input goes
through the server's own pipeline (the bounded decode pool, the batcher, the inference thread);
with ``--server``, through the project's client, whose retries honour ``Retry-After`` on 503.
Rows are written as they finish: in input order (a row waits only for those before it, and the
window bounds how many wait) or, with ``ordered=False``, as they come. A stop (Ctrl-C, a server
gone, an output that fails) cancels the inputs in flight: they get no row, so ``--resume``
classifies them, where a row with the stop's error would have been taken for their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import glob
import io
import json
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Protocol

from resnet_serve.decode import is_heif_without_its_extra, looks_like_an_image
from resnet_serve.errors import (
    OutputClosed,
    OutputFailed,
    PayloadTooLarge,
    ServeError,
    ServerRefused,
    ServerUnreachable,
)
from resnet_serve.inference import ModelInfo
from resnet_serve.labels import Labels
from resnet_serve.loading import open_model
from resnet_serve.photos import IMAGE_SUFFIXES
from resnet_serve.pipeline import Pipeline
from resnet_serve.results import top_k
from resnet_serve.settings import Settings

OFFLINE_DEADLINE_S = 3600.0  # offline, an input waits only for the ones ahead of it
REMOTE_RETRIES = 8
COLUMNS = ("path", "class_ids", "labels_en", "labels_zh", "confidences", "width", "height", "format", "error")
LIST_SEPARATOR = "|"
OUTPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass
class Row:
    """One input's answer: its Top-K, the image's size and format, or its error."""

    path: str
    class_ids: list[int] = field(default_factory=list)
    labels_en: list[str] = field(default_factory=list)
    labels_zh: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None


Predict = Callable[[Path], Awaitable[Row]]
PATH_ERRORS = "surrogateescape"  # a file name that is not UTF-8 round-trips as its bytes


def read_input(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, or an error before reading what could never be served: not a regular
    file (opening a FIFO or reading a device would block or never end), or over ``max_bytes``."""
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"not a regular file: {shown(str(path))}")
        if info.st_size > max_bytes:
            raise PayloadTooLarge.upload_over(max_bytes)
        data = f.read(max_bytes + 1)  # a file that grew since fstat is still cut at the limit
    if len(data) > max_bytes:
        raise PayloadTooLarge.upload_over(max_bytes)
    return data


def shown(path: str) -> str:
    """A path fit for a terminal: bytes that are not UTF-8 written as ``\\xff``."""
    return path.encode("utf-8", PATH_ERRORS).decode("utf-8", "backslashreplace")


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(16)
        return looks_like_an_image(head) or is_heif_without_its_extra(head)
    except OSError:
        return False


def find_inputs(arguments: Iterable[str], stdin: IO[str] | None = None) -> list[Path]:
    """The inputs in order, each once: files as given (whatever their type: a bad one gets an
    error row), images found in folders (sorted), glob matches, and stdin's lines for ``-``."""
    found: dict[Path, None] = {}
    for argument in arguments:
        if argument == "-":
            source = stdin if stdin is not None else io.TextIOWrapper(
                sys.stdin.buffer, encoding=sys.getfilesystemencoding(), errors=PATH_ERRORS)
            found.update((Path(line.strip()), None) for line in source if line.strip())
        elif Path(argument).is_dir():
            found.update((p, None) for p in sorted(Path(argument).rglob("*")) if p.is_file() and _is_image(p))
        elif any(c in argument for c in "*?[") and not Path(argument).exists():
            found.update((Path(p), None) for p in sorted(glob.glob(argument, recursive=True)) if Path(p).is_file())
        else:
            found[Path(argument)] = None
    return list(found)


class Sink(Protocol):
    def write(self, row: Row) -> None: ...

    def close(self) -> None: ...


class TextSink:
    """For eyes: the path, then one line per class; errors to stderr."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self.out, self.err = out, err

    def write(self, row: Row) -> None:
        if row.error is not None:
            print(f"{shown(row.path)}: {row.error}", file=self.err)
            return
        lines = [shown(row.path)] + [f"  {rank:>2}. {p * 100:6.2f}%  {i:>3}  {en}  ({zh})" for rank, (p, i, en, zh)
                              in enumerate(zip(row.confidences, row.class_ids, row.labels_en, row.labels_zh), 1)]
        try:
            print("\n".join(lines), file=self.out, flush=True)
        except BrokenPipeError:
            raise OutputClosed("stdout") from None

    def close(self) -> None:
        pass


class FileSink:
    """CSV (lists joined by ``|``) or JSON Lines, appended and flushed row by row, so a stopped
    run loses nothing it wrote and ``--resume`` can continue it. A file that cannot be written
    (a missing folder, a full disk) raises ``OutputFailed``: the run stops, the rows written stay."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix and path.suffix.lower() not in OUTPUT_SUFFIXES:  # no suffix (/dev/stdout): CSV
            raise OutputFailed(f"{shown(str(path))}: rows are written as .csv or .jsonl, not {path.suffix}")
        self.jsonl = path.suffix.lower() == ".jsonl"
        with self._writing():
            fresh = not path.exists() or path.stat().st_size == 0
            self.file = path.open("a", encoding="utf-8", errors=PATH_ERRORS, newline="")
        self.csv = None if self.jsonl else csv.writer(self.file)
        if self.csv is not None and fresh:
            self._write(lambda: self.csv.writerow(COLUMNS))  # type: ignore[union-attr]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise OutputClosed(shown(str(self.path))) from None
        except OSError as exc:
            raise OutputFailed(f"cannot write {shown(str(self.path))}: {exc.strerror or exc}") from None

    def _write(self, write: Callable[[], object]) -> None:
        with self._writing():
            write()
            self.file.flush()

    def write(self, row: Row) -> None:
        if self.csv is None:
            self._write(lambda: self.file.write(json.dumps(asdict(row), ensure_ascii=False) + "\n"))
            return
        values = asdict(row)
        self._write(lambda: self.csv.writerow(  # type: ignore[union-attr]
            [LIST_SEPARATOR.join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
             for v in (values[c] for c in COLUMNS)]))

    def close(self) -> None:
        with self._writing():
            self.file.close()


def _answered(error: object) -> bool:
    """A row's answer stands: a result, or an error about the input itself (4xx, an unreadable
    file); not a server's error (5xx: busy, timed out, interrupted), which may pass."""
    return not (isinstance(error, str) and error[:3].isdigit() and error.startswith("5"))


def _json_row(line: str) -> dict[str, object] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None  # cut short
    return row if isinstance(row, dict) and "path" in row else None


def done_paths(path: Path) -> set[str]:
    """The inputs an earlier run answered in ``path``. The file is rewritten first (a new file
    put in its place) without the rows to do again: a row cut short (a full disk, a kill),
    which the next row appended would run into, and a row with a server's error. The other
    rows stay as written."""
    if not path.is_file():  # nothing yet, or not a file to read back (/dev/stdout)
        return set()
    try:
        text = path.read_text("utf-8", errors=PATH_ERRORS)
    except OSError as exc:
        raise OutputFailed(f"cannot read {shown(str(path))} to resume: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".jsonl":
        lines = text.splitlines()
        kept = [(line, row) for line, row in ((line, _json_row(line)) for line in lines)
                if row is not None and _answered(row.get("error"))]
        paths = [str(row["path"]) for _, row in kept]
        rewritten = "".join(f"{line}\n" for line, _ in kept)
        unchanged = len(kept) == len(lines) and text.endswith("\n")
    else:
        every = list(csv.DictReader(io.StringIO(text)))  # a row cut short has None for its missing columns
        rows = [row for row in every if None not in row and None not in row.values() and _answered(row["error"])]
        paths = [row["path"] for row in rows]
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        rewritten, unchanged = out.getvalue(), len(rows) == len(every) and text.endswith("\n")
    if not unchanged:
        _replace(path, rewritten)
    return set(paths)


def _replace(path: Path, text: str) -> None:
    """``path`` holds ``text`` after this, or, if it cannot be written, is left as it was."""
    fresh = path.with_name(f".{path.name}.resume")
    try:
        with open(fresh, "w", encoding="utf-8", errors=PATH_ERRORS, newline="") as f:
            f.write(text)
        os.replace(fresh, path)
    except OSError as exc:
        fresh.unlink(missing_ok=True)
        raise OutputFailed(f"cannot rewrite {shown(str(path))} to resume: {exc.strerror or exc}") from None


class Progress:
    """A bar on a terminal (tqdm), a line every few seconds elsewhere, or nothing (``quiet``)."""

    def __init__(self, total: int, *, quiet: bool, stream: IO[str], every_s: float = 5.0) -> None:
        self.total, self.done, self.started, self.stream, self.every_s = total, 0, time.monotonic(), stream, every_s
        self._last = self.started
        self.bar = None
        if not quiet and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=stream, dynamic_ncols=True)
        self.quiet = quiet

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif not self.quiet and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            print(f"{self.done}/{self.total} images, {self.rate():.1f}/s", file=self.stream, flush=True)

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"{self.ok} ok, {self.failed} failed" + (f", {self.skipped} already done" if self.skipped else "")
                + f" in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)")


async def classify(inputs: list[Path], predict: Predict, sink: Sink, *, window: int, ordered: bool = True,
                   progress: Progress | None = None) -> Summary:
    """Every input through ``predict`` with at most ``window`` in flight, its row to ``sink``."""
    summary, started = Summary(), time.monotonic()
    slots = asyncio.Semaphore(window)
    finished: dict[int, Row] = {}
    next_out = 0

    def emit(row: Row) -> None:
        sink.write(row)
        if row.error is None:
            summary.ok += 1
        else:
            summary.failed += 1
        slots.release()
        if progress is not None:
            progress.update()

    async def one(index: int, path: Path) -> None:
        nonlocal next_out
        try:
            row = await predict(path)
        except (ServeError, OSError) as exc:
            row = Row(str(path), error=_described(exc))
        if not ordered:
            emit(row)
            return
        finished[index] = row
        while next_out in finished:
            emit(finished.pop(next_out))
            next_out += 1

    # The task group stops the run at the first input that fails it (a server gone, an output
    # that fails), even while this loop waits for a slot that input will never give back, and
    # cancels the inputs in flight on any stop (Ctrl-C too): they get no row, rather than the
    # stop's error as theirs, so --resume does them again.
    try:
        async with asyncio.TaskGroup() as group:
            for index, path in enumerate(inputs):
                await slots.acquire()
                group.create_task(one(index, path))
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    summary.seconds = time.monotonic() - started
    return summary


def _described(exc: BaseException) -> str:
    if isinstance(exc, ServeError):
        return f"{exc.status_code} {exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def row_of(path: Path, probs: object, labels: Labels, k: int, image: tuple[int, int, str]) -> Row:
    values, ids = top_k(probs, k)  # type: ignore[arg-type]
    return Row(str(path), ids, [labels.en[i] for i in ids], [labels.zh[i] for i in ids],
               [round(v, 6) for v in values], *image)


async def run_offline(inputs: list[Path], settings: Settings, sink: Sink, *, model: str | None, k: int,
                      ordered: bool = True, progress: Progress | None = None) -> tuple[Summary, ModelInfo]:
    """In this process, through the server's pipeline: decode pool, batcher, inference thread."""
    engine = await asyncio.to_thread(open_model, settings, model)
    pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="resnet-serve-decode")
    pipeline = Pipeline(engine, settings.model_copy(update={"cache_size": 0}), pool)
    labels = engine.info.spec.labels

    async def predict(path: Path) -> Row:
        data = await asyncio.to_thread(read_input, path, settings.max_upload_bytes)
        result = await pipeline.predict_bytes(data, time.monotonic() + OFFLINE_DEADLINE_S)
        return row_of(path, result.probs, labels, k, (result.width, result.height, result.format))

    window = 2 * settings.max_batch_size + settings.decode_threads  # keeps a batch queued behind the one running
    try:
        return await classify(inputs, predict, sink, window=window, ordered=ordered, progress=progress), engine.info
    finally:
        await pipeline.close(0)
        engine.close()
        pool.shutdown(wait=False, cancel_futures=True)


async def run_remote(inputs: list[Path], url: str, sink: Sink, *, model: str | None, k: int, concurrency: int,
                     api_key: str | None = None, ordered: bool = True, progress: Progress | None = None) -> Summary:
    """Through a running server with the project's client: keep-alive connections, ``concurrency``
    requests at once, a 503 retried after its ``Retry-After``. A server that cannot be reached
    stops the run (the rows written stay; ``--resume`` continues it)."""
    import httpx

    from resnet_serve.client import AsyncClient, ClientError

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with AsyncClient(url, api_key=api_key, retries=REMOTE_RETRIES, timeout=120.0, limits=limits) as client:
        try:  # the server's upload limit, so a file past it is refused here rather than sent
            max_bytes = int((await client.model(model)).max_upload_mb * 1024 * 1024)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from None
        except ClientError as exc:
            raise ServerRefused(f"{url}: {exc}") from None

        async def predict(path: Path) -> Row:
            data = await asyncio.to_thread(read_input, path, max_bytes)
            try:
                answer = await client.predict(data, top_k=k, filename=shown(path.name), model=model)
            except ClientError as exc:
                if exc.status == 401 or exc.code == "model_not_found":  # so would every input be: stop
                    raise ServerRefused(f"{url}: {exc}") from None
                return Row(str(path), error=f"{exc.status} {exc.code}: {exc.message}")
            except httpx.TransportError as exc:
                raise ServerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from None
            p = answer.predictions
            return Row(str(path), [c.class_id for c in p], [c.label_en for c in p], [c.label_zh for c in p],
                       [round(c.confidence, 6) for c in p], answer.image.width, answer.image.height, answer.image.format)

        return await classify(inputs, predict, sink, window=concurrency, ordered=ordered, progress=progress)
