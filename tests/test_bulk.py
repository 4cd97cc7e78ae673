"""Bulk classification (``resnet-serve predict``): inputs found, a row for each (errors marked),
rows in order within a bounded window, ``--resume``, and the same job through a running server
that sometimes answers 503."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from resnet_serve import bulk, decode
from resnet_serve.cli import main
from resnet_serve.errors import ServerUnreachable
from tests.conftest import encode, env_with, real_server, wait_ready


@pytest.fixture
def folder(tmp_path: Path, photos: dict[str, Image.Image], photo_jpegs: dict[str, bytes]) -> Path:
    """Nested folders: JPEGs, a PNG, a corrupt JPEG, a text file named .jpg, a JPEG without an
    extension, and files that are not images at all."""
    root = tmp_path / "photos"
    (root / "cats" / "old").mkdir(parents=True)
    (root / "things").mkdir()
    (root / "cats" / "chelsea.jpg").write_bytes(photo_jpegs["chelsea"])
    (root / "cats" / "old" / "coffee.JPEG").write_bytes(photo_jpegs["coffee"])
    (root / "things" / "horse.png").write_bytes(encode(photos["horse"], "PNG"))
    (root / "things" / "rocket").write_bytes(photo_jpegs["rocket"])  # an image by its bytes, not its name
    (root / "things" / "broken.jpg").write_bytes(photo_jpegs["astronaut"][:2000])
    (root / "things" / "notes.jpg").write_text("a text file named .jpg")
    (root / "things" / "readme.txt").write_text("not an image, not named like one")
    return root


EXPECTED = ["cats/chelsea.jpg", "cats/old/coffee.JPEG", "things/broken.jpg", "things/horse.png",
            "things/notes.jpg", "things/rocket"]


def test_inputs_come_from_folders_globs_files_and_stdin(folder: Path) -> None:
    found = bulk.find_inputs([str(folder)])
    assert [str(p.relative_to(folder)) for p in found] == EXPECTED  # readme.txt is left out
    globbed = bulk.find_inputs([str(folder / "**" / "*.jpg")])
    assert {p.name for p in globbed} == {"chelsea.jpg", "broken.jpg", "notes.jpg"}
    explicit = bulk.find_inputs(["-", str(folder / "things" / "readme.txt")],
                                stdin=io.StringIO(f"{folder / 'cats' / 'chelsea.jpg'}\n\n"))
    assert [p.name for p in explicit] == ["chelsea.jpg", "readme.txt"]  # a file named is a file taken


def test_iphone_photos_in_a_folder_are_found_by_name_or_bytes(tmp_path: Path, photos: dict[str, Image.Image],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    heic = encode(photos["chelsea"], "HEIF")
    (tmp_path / "IMG_0001.HEIC").write_bytes(heic)
    (tmp_path / "IMG_0002").write_bytes(heic)
    (tmp_path / "cat.avif").write_bytes(encode(photos["chelsea"], "AVIF"))
    (tmp_path / "cat2").write_bytes(encode(photos["chelsea"], "AVIF"))
    found = ["IMG_0001.HEIC", "IMG_0002", "cat.avif", "cat2"]
    assert [p.name for p in bulk.find_inputs([str(tmp_path)])] == found
    monkeypatch.setattr(decode, "pillow_heif", None)  # an install without the heif extra
    assert [p.name for p in bulk.find_inputs([str(tmp_path)])] == found  # each to get its row naming the extra


@pytest.fixture
def offline_env(seeded_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_WEIGHTS", str(seeded_weights))
    monkeypatch.setenv("RESNET_SERVE_ALLOW_DOWNLOAD", "false")
    monkeypatch.setenv("RESNET_SERVE_RUNTIME", "torchscript")


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_input_gets_a_row_and_errors_are_marked(folder: Path, tmp_path: Path, offline_env: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(folder), "--output", str(out), "--top-k", "5"]) == 0
    written = rows(out)
    assert [str(Path(r["path"]).relative_to(folder)) for r in written] == EXPECTED  # input order
    by_name = {Path(r["path"]).name: r for r in written}
    assert by_name["broken.jpg"]["error"].startswith("400 invalid_image")
    assert by_name["notes.jpg"]["error"].startswith("415 unsupported_media_type")
    for name in ("chelsea.jpg", "coffee.JPEG", "horse.png", "rocket"):
        row = by_name[name]
        assert row["error"] is None and len(row["class_ids"]) == 5 and len(row["labels_zh"]) == 5
        assert row["confidences"] == sorted(row["confidences"], reverse=True)
    assert (by_name["horse.png"]["format"], by_name["chelsea.jpg"]["width"]) == ("PNG", 451)
    assert "4 ok, 2 failed" in capsys.readouterr().err


def test_resume_writes_each_input_once(folder: Path, tmp_path: Path, offline_env: None,
                                       photo_jpegs: dict[str, bytes]) -> None:
    out = tmp_path / "out.csv"
    assert main(["predict", str(folder), "--output", str(out), "--quiet"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + len(EXPECTED) and lines[0].startswith("path,class_ids")
    out.write_text("\n".join(lines[:3]) + "\n")  # as if stopped after two rows
    (folder / "cats" / "late.jpg").write_bytes(photo_jpegs["horse"])  # and one photo more since
    assert main(["predict", str(folder), "--output", str(out), "--resume", "--quiet"]) == 0
    resumed = out.read_text().splitlines()
    paths = [line.split(",", 1)[0] for line in resumed[1:]]
    assert sorted(paths) == sorted(str(folder / p) for p in [*EXPECTED, "cats/late.jpg"])  # each once
    assert resumed[:3] == lines[:3]  # what the first run wrote stays
    assert main(["predict", str(folder), "--output", str(out), "--resume", "--quiet"]) == 0
    assert out.read_text().splitlines() == resumed  # nothing left to do: no row added


def test_what_cannot_be_served_is_refused_before_it_is_read(tmp_path: Path, offline_env: None, photo_jpegs: dict[str, bytes],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MAX_UPLOAD_MB", "1")
    fifo, big, photo = tmp_path / "pipe.jpg", tmp_path / "big.jpg", tmp_path / "chelsea.jpg"
    os.mkfifo(fifo)
    big.write_bytes(os.urandom(1024 * 1024 + 1))
    photo.write_bytes(photo_jpegs["chelsea"])
    # Were the FIFO opened for reading, it would wait for a writer for ever: this one comes late.
    late_writer = threading.Timer(10, lambda: os.close(os.open(fifo, os.O_RDWR)))
    late_writer.daemon = True
    late_writer.start()
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    assert main(["predict", str(fifo), "/dev/null", str(big), str(photo), "--output", str(out), "--quiet"]) == 0
    assert time.monotonic() - started < 10
    late_writer.cancel()
    errors = {Path(r["path"]).name: r["error"] for r in rows(out)}
    assert errors["pipe.jpg"] == f"OSError: not a regular file: {fifo}"
    assert errors["null"] == "OSError: not a regular file: /dev/null"
    assert errors["big.jpg"] == "413 payload_too_large: the upload exceeds the 1 MB limit"
    assert errors["chelsea.jpg"] is None


def test_a_file_name_that_is_not_utf8_is_kept_as_its_bytes(tmp_path: Path, offline_env: None,
                                                           photo_jpegs: dict[str, bytes],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    name = os.fsencode(tmp_path) + b"/caf\xe9.jpg"  # Latin-1, as an old camera or archive names it
    with open(name, "wb") as f:
        f.write(photo_jpegs["coffee"])
    for out in (tmp_path / "out.jsonl", tmp_path / "out.csv"):
        assert main(["predict", str(tmp_path), "--output", str(out), "--quiet"]) == 0
        written = out.read_bytes()
        assert name in written and written.count(b"caf") == 1
        assert main(["predict", str(tmp_path), "--output", str(out), "--resume", "--quiet"]) == 0
        assert out.read_bytes() == written  # found again: not classified twice
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(name + b"\n"), encoding="utf-8"))  # find | predict -
    assert main(["predict", "-"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("caf\\xe9.jpg")  # escaped for a terminal


def test_an_output_that_cannot_be_written_stops_the_run_with_a_message(
    folder: Path, tmp_path: Path, offline_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")  # a disk that is full when the first row is written
    missing, wrong = tmp_path / "missing" / "out.csv", tmp_path / "out.json"
    for output, message in {missing: f"cannot write {missing}: No such file or directory",
                            full: f"cannot write {full}: No space left on device",
                            wrong: f"{wrong}: rows are written as .csv or .jsonl, not .json"}.items():
        assert main(["predict", str(folder), "--output", str(output), "--resume", "--quiet"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"


def test_ctrl_c_leaves_no_row_for_what_was_in_flight_and_resume_finishes(
    tmp_path: Path, seeded_weights: Path, photo_jpegs: dict[str, bytes]
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(120):
        (folder / f"{i:03}.jpg").write_bytes(photo_jpegs["coffee"])
    out = tmp_path / "out.csv"
    command = [sys.executable, "-m", "resnet_serve", "predict", str(folder), "--output", str(out), "--quiet"]
    env = env_with(weights=str(seeded_weights), allow_download="false")
    run = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 6) and time.monotonic() < end:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert err.splitlines()[-1] == f"stopped; {out} keeps the rows written, and --resume continues"
    assert "Traceback" not in err and "never retrieved" not in err
    stopped = out.read_text().splitlines()
    assert 6 <= len(stopped) < 121 and all(line.endswith("JPEG,") for line in stopped[1:])  # no error rows
    subprocess.run([*command, "--resume"], env=env, check=True, timeout=300)
    paths = [line.split(",", 1)[0] for line in out.read_text().splitlines()[1:]]
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir())  # every input once, none lost


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_does_again_what_a_server_error_or_a_cut_left(suffix: str, tmp_path: Path) -> None:
    out = tmp_path / f"out{suffix}"
    sink = bulk.FileSink(out)
    answered = bulk.Row("a.jpg", [1], ["one"], ["一"], [0.9], 10, 10, "JPEG")
    refused = bulk.Row("b.jpg", error="415 unsupported_media_type: not an image")
    for row in (answered, refused, bulk.Row("c.jpg", error="503 overloaded: busy"),
                bulk.Row("d.jpg", error="504 deadline_exceeded: too slow"), bulk.Row("e.jpg", [2], ["two"], ["二"], [0.5])):
        sink.write(row)
    sink.close()
    text = out.read_bytes()
    out.write_bytes(text[:-12])  # the last row cut short, as by a full disk
    assert bulk.done_paths(out) == {"a.jpg", "b.jpg"}
    assert bulk.done_paths(out) == {"a.jpg", "b.jpg"}  # as rewritten
    sink = bulk.FileSink(out)
    sink.write(bulk.Row("e.jpg", [2], ["two"], ["二"], [0.5], 9, 9, "PNG"))
    sink.close()
    assert bulk.done_paths(out) == {"a.jpg", "b.jpg", "e.jpg"}  # the row after a cut one is whole
    assert out.read_bytes().startswith(text[:text.index(b"c.jpg")].rsplit(b"\n", 1)[0])  # the rows kept are as written


def test_rows_keep_input_order_within_a_bounded_window() -> None:
    inputs = [Path(f"{i}.jpg") for i in range(20)]
    in_flight, most = 0, 0

    async def predict(path: Path) -> bulk.Row:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep((20 - int(path.stem)) / 2000)  # later inputs finish first
        in_flight -= 1
        return bulk.Row(str(path))

    class Collect:
        def __init__(self) -> None:
            self.rows: list[str] = []

        def write(self, row: bulk.Row) -> None:
            self.rows.append(row.path)

        def close(self) -> None:
            pass

    ordered, unordered = Collect(), Collect()
    summary = asyncio.run(bulk.classify(inputs, predict, ordered, window=4))
    assert ordered.rows == [str(p) for p in inputs] and most <= 4 and summary.ok == 20
    asyncio.run(bulk.classify(inputs, predict, unordered, window=4, ordered=False))
    assert sorted(unordered.rows) == sorted(ordered.rows) and unordered.rows != ordered.rows


def test_an_input_that_stops_the_run_stops_it_even_while_inputs_wait_for_a_slot() -> None:
    """The first input's failure must end the run though the loop that starts inputs waits for a
    slot, which that input never gives back: it hung there before."""
    async def predict(path: Path) -> bulk.Row:
        await asyncio.sleep(0.01)
        raise ServerUnreachable("gone")

    class Keep:
        def write(self, row: bulk.Row) -> None:
            raise AssertionError("no row for an input the stop interrupted")

        def close(self) -> None:
            pass

    inputs = [Path(f"{i}.jpg") for i in range(10)]
    with pytest.raises(ServerUnreachable, match="gone"):
        asyncio.run(asyncio.wait_for(bulk.classify(inputs, predict, Keep(), window=2), timeout=10))


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path: Path, seeded_weights: Path,
                                                      photo_jpegs: dict[str, bytes]) -> None:
    """``predict DIR | head -1``: exit 141 as the shell's tools do, no traceback, no hang."""
    for i in range(60):  # rows still to come when the reader goes
        (tmp_path / f"{i:02}.jpg").write_bytes(photo_jpegs["chelsea"])
    command = [sys.executable, "-m", "resnet_serve", "predict", str(tmp_path), "--quiet"]
    run = subprocess.Popen(command, env=env_with(weights=str(seeded_weights), allow_download="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout is not None and run.stdout.readline().strip().endswith("00.jpg")
    run.stdout.close()  # as head does once it has its line
    _, err = run.communicate(timeout=120)
    assert run.returncode == 141 and "Traceback" not in err and "Error" not in err, err


def test_progress_is_a_line_now_and_then_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = bulk.Progress(3, quiet=False, stream=stream, every_s=0.0)
    for _ in range(3):
        progress.update()
    assert stream.getvalue().splitlines()[-1].startswith("3/3 images")
    silent = io.StringIO()
    bulk.Progress(3, quiet=True, stream=silent, every_s=0.0).update()
    assert silent.getvalue() == ""


API_KEY = "k3y"


@pytest.fixture
def busy_server(seeded_weights: Path, tmp_path: Path) -> Iterator[str]:
    """A server that batches one at a time with no queue (concurrent uploads get 503s), takes
    uploads up to 1 MB, and wants an API key."""
    with real_server(tmp_path / "server.log", weights=str(seeded_weights), allow_download="false",
                     max_batch_size="1", max_queue="1", cache_size="0", max_upload_mb="1", api_key=API_KEY) as (url, process):
        wait_ready(url, process)
        yield url


def test_through_a_server_that_answers_503_the_rows_match_offline(
    busy_server: str, folder: Path, tmp_path: Path, offline_env: None
) -> None:
    offline, remote = tmp_path / "offline.jsonl", tmp_path / "remote.jsonl"
    assert main(["predict", str(folder), "--output", str(offline), "--quiet"]) == 0
    assert main(["predict", str(folder), "--output", str(remote), "--quiet", "--server", busy_server,
                 "--concurrency", "6", "--api-key", API_KEY]) == 0
    metrics = httpx.get(f"{busy_server}/metrics").text
    refused = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("resnet_serve_requests_total") and 'status="503"' in line)
    assert refused > 0  # the server did turn requests away; they were retried
    mine, theirs = rows(offline), rows(remote)
    assert [r["path"] for r in mine] == [r["path"] for r in theirs]
    for a, b in zip(mine, theirs):
        assert (a["error"] is None) == (b["error"] is None), (a, b)
        if a["error"] is None:
            assert a["class_ids"][0] == b["class_ids"][0] and (a["width"], a["height"]) == (b["width"], b["height"])
        else:
            assert a["error"].split(":")[0] == b["error"].split(":")[0]  # same status and code


def test_a_file_past_the_servers_limit_is_not_sent_and_a_refusal_of_all_stops_the_run(
    busy_server: str, tmp_path: Path, photo_jpegs: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "big.jpg").write_bytes(photo_jpegs["chelsea"] + os.urandom(1024 * 1024))  # the server's limit: 1 MB
    (tmp_path / "chelsea.jpg").write_bytes(photo_jpegs["chelsea"])
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(tmp_path), "--output", str(out), "--quiet", "--server", busy_server,
                 "--api-key", API_KEY]) == 0
    errors = {Path(r["path"]).name: r["error"] for r in rows(out)}
    assert errors == {"big.jpg": "413 payload_too_large: the upload exceeds the 1 MB limit", "chelsea.jpg": None}
    assert 'status="413"' not in httpx.get(f"{busy_server}/metrics").text  # refused here, never uploaded
    capsys.readouterr()
    assert main(["predict", str(tmp_path), "--quiet", "--server", busy_server, "--model", "nope"]) == 2
    assert "404 model_not_found" in capsys.readouterr().err  # once, for the run, not a row per input
    refused = tmp_path / "refused.jsonl"
    assert main(["predict", str(tmp_path), "--output", str(refused), "--quiet", "--server", busy_server,
                 "--api-key", "wrong"]) == 2
    assert "401 unauthorized" in capsys.readouterr().err
    assert [r["path"] for r in rows(refused)] == [str(tmp_path / "big.jpg")]  # refused here; chelsea: no 401 row


def test_nothing_to_classify_is_an_error_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes.txt").write_text("no image here")
    monkeypatch.setenv("RESNET_SERVE_MODEL_REPOSITORY", str(tmp_path / "missing"))  # loading a model would fail
    assert main(["predict", str(tmp_path), str(tmp_path / "*.jpgg")]) == 2
    assert capsys.readouterr().err == f"error: no image found in {tmp_path} {tmp_path / '*.jpgg'}\n"


def test_an_unreachable_server_stops_the_run_with_a_message(folder: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert main(["predict", str(folder), "--output", str(tmp_path / "o.csv"), "--server", "127.0.0.1:9"]) == 2
    assert "error: http://127.0.0.1:9: ConnectError" in capsys.readouterr().err  # http:// when no scheme is given
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("concurrency", ["0", "-3", "many"])
def test_a_concurrency_below_one_is_refused_rather_than_waiting_for_ever(folder: Path, concurrency: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["predict", str(folder), "--server", "127.0.0.1:9", "--concurrency", concurrency])
    assert stopped.value.code == 2 and "give a whole number of at least 1" in capsys.readouterr().err


def test_the_text_output_is_for_eyes(folder: Path, offline_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(folder / "cats" / "chelsea.jpg"), str(folder / "things" / "notes.jpg"),
                 "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].endswith("chelsea.jpg") and "%" in captured.out
    assert "notes.jpg: 415" in captured.err and "1 ok, 1 failed" in captured.err
    assert main(["predict", str(folder / "things" / "notes.jpg"), "--quiet"]) == 1  # every input failed
