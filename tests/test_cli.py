"""The command line: a real ``resnet-serve serve`` process over TCP, and the offline commands."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from resnet_serve.cli import main
from tests.conftest import env_with, free_port, real_server, wait_ready

CLI = [sys.executable, "-m", "resnet_serve"]


@pytest.fixture
def server(seeded_weights: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with real_server(tmp_path / "server.log", weights=str(seeded_weights), allow_download="false",
                     torch_threads="2", device="cpu") as running:
        yield running


def test_serve_answers_over_tcp_and_exits_cleanly_on_sigterm(
    server: tuple[str, subprocess.Popen[bytes]], photo_jpegs: dict[str, bytes]
) -> None:
    base, process = server
    wait_ready(base, process)
    with httpx.Client(base_url=base, timeout=30) as client:
        response = client.post("/predict?top_k=5", files={"file": ("cat.jpg", photo_jpegs["chelsea"], "image/jpeg")})
        assert response.status_code == 200
        assert len(response.json()["predictions"]) == 5
        assert client.get("/model").json()["device"] == "cpu"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


# The command as pip's console script runs it: the entry module, then main().
GC_PROBE = """
import gc, sys
import uvicorn
from resnet_serve.__main__ import main
print("entry", gc.isenabled())
uvicorn.Config.bind_socket = lambda self: None
uvicorn.Server.run = lambda self, sockets: print("serve", gc.isenabled(), gc.get_freeze_count() > 0,
                                                "resnet_serve.http.app" in sys.modules, self.config.app)
main(sys.argv[1:])
print("after", gc.isenabled())
"""


@pytest.mark.parametrize(("command", "expected"), [
    (["serve"], ["entry False", "serve True True True resnet_serve.http.app:create_app", "after True"]),
    (["info"], ["entry False", "after True"]),
])
def test_the_gc_is_paused_for_start_up_imports_only(command: list[str], expected: list[str]) -> None:
    """Paused from the entry module on; resumed before uvicorn serves, with the app's modules
    imported and start-up's objects frozen; resumed at once by the other commands."""
    result = subprocess.run([sys.executable, "-c", GC_PROBE, *command], env=env_with(), capture_output=True,
                            text=True, timeout=120, check=True)
    assert [line for line in result.stdout.splitlines() if line.split(" ")[0] in ("entry", "serve", "after")] == expected


def test_serve_refuses_to_start_in_official_mode_without_the_weights(tmp_path: Path) -> None:
    env = env_with(weights_mode="official", allow_download="false", weights_dir=str(tmp_path))
    result = subprocess.run([*CLI, "serve", "--port", str(free_port())], env=env, capture_output=True, timeout=120)
    assert result.returncode == 3
    assert b"ERROR:    cannot start: no resnet18-f37072fd.pth in " in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_server_that_never_started_exits_with_uvicorn_s_startup_failure_status(tmp_path: Path, workers: str) -> None:
    """With several workers too: there uvicorn.run returns as after a clean stop (orchestrators
    and scripts would take a server that never served for one that stopped when told)."""
    env = env_with(workers=workers, model_repository=str(tmp_path / "missing"))
    result = subprocess.run([*CLI, "serve", "--port", str(free_port())], env=env, capture_output=True, timeout=120)
    assert result.returncode == 3 and b"missing is not a folder" in result.stdout + result.stderr
    assert b"Traceback" not in result.stderr and b"shutting down" not in result.stderr  # one line, the mistake


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_fails_before_any_model_loads(workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*CLI, "serve", "--port", str(port)], env=env_with(workers=workers),
                                capture_output=True, timeout=120)
    assert result.returncode == 3 and b"Address already in use" in result.stderr
    assert b"application startup" not in result.stderr and b"Traceback" not in result.stderr  # no app was built


def test_in_json_every_line_of_a_server_is_json_the_supervisor_s_included(tmp_path: Path) -> None:
    env = env_with(workers="2", log_format="json", model_repository=str(tmp_path / "missing"))
    result = subprocess.run([*CLI, "serve", "--port", str(free_port())], env=env, capture_output=True, timeout=120)
    lines = [json.loads(line) for line in result.stderr.decode().splitlines()]  # fails on any plain line
    assert result.returncode == 3 and "Started parent process" in lines[0]["message"] + lines[1]["message"]
    assert sum(line["message"].startswith("cannot start: RESNET_SERVE_MODEL_REPOSITORY=") for line in lines) == 2


def test_bad_settings_are_named_one_line_each_before_anything_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESNET_SERVE_PRECISION", "int4")
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("RESNET_SERVE_PORT", "8000")  # serve writes its flags there: so it is undone after
    assert main(["serve", "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n  RESNET_SERVE_") == 3
    assert "RESNET_SERVE_PRECISION='int4': Input should be 'auto', 'fp32', 'fp16', 'bf16' or 'int8'" in err
    assert "RESNET_SERVE_MAX_BATCH_SIZE='0'" in err and "RESNET_SERVE_PORT='99999'" in err  # a flag, as its variable


def test_a_rule_between_settings_is_one_line_too(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MODEL_CONTROL", "explicit")
    monkeypatch.setenv("RESNET_SERVE_WORKERS", "2")  # serve writes its flags there: so it is undone after
    assert main(["serve", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\n  RESNET_SERVE_MODEL_CONTROL=explicit needs one worker" in err


def test_predict_prints_a_top_k_table(
    seeded_weights: Path, photo_jpegs: dict[str, bytes], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(photo_jpegs["chelsea"])
    (tmp_path / "notes.jpg").write_text("not an image")
    monkeypatch.setenv("RESNET_SERVE_WEIGHTS", str(seeded_weights))
    assert main(["predict", str(image), str(tmp_path / "notes.jpg"), "--top-k", "4"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == str(image)
    assert [line.split(".")[0].strip() for line in lines[1:]] == ["1", "2", "3", "4"]
    assert "%" in lines[1] and "notes.jpg" in captured.err


def test_info_reports_what_would_run(seeded_weights: Path, capsys: pytest.CaptureFixture[str],
                                     caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_WEIGHTS", str(seeded_weights))
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH", "8")
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "RESNET_SERVE_MAX_BATCH is not a setting and is ignored (did you mean RESNET_SERVE_MAX_BATCH_SIZE?)" in [
        record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert report["weights"] == "custom" and report["weights_path"] == str(seeded_weights)
    assert report["torch"].startswith("2.14.1") and report["settings"]["max_batch_size"] == 4


def test_download_weights_fails_clearly_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_serve import spec

    unreachable = dataclasses.replace(spec.RESNET18, url="http://127.0.0.1:9/resnet18-f37072fd.pth")
    monkeypatch.setitem(spec.BUILTIN, "resnet18", unreachable)
    assert main(["download-weights", "--dir", str(tmp_path)]) == 2
    assert "could not download" in capsys.readouterr().err


def test_export_writes_torchscript_and_onnx_that_load_and_agree(
    seeded_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    import onnxruntime
    import torch

    repository = tmp_path / "models"
    assert main(["export", "--weights", str(seeded_weights), "--repository", str(repository),
                 "--format", "torchscript,onnx"]) == 0
    out = capsys.readouterr().out
    assert "custom weights" in out and "model.fp32.pt" in out and "model.fp32.onnx" in out
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    folder = repository / "resnet18" / "1"
    scripted = torch.jit.load(str(folder / "model.fp32.pt"))(pixels)
    session = onnxruntime.InferenceSession(str(folder / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probs", "features"]  # features: for CAM without torch
    onnx_probs, features = session.run(None, {"pixels": pixels.numpy()})
    assert scripted.shape == (2, 1000) and features.shape == (2, 512, 7, 7)
    assert np.allclose(onnx_probs, scripted.numpy(), atol=1e-5)
    assert (folder / "model.fp32.cam.npz").is_file()


def test_int8_export_is_calibrated_and_reports_its_agreement(
    seeded_weights: Path, photo_jpegs: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    photos = tmp_path / "calibration"
    photos.mkdir()
    for name, data in photo_jpegs.items():
        (photos / f"{name}.jpg").write_bytes(data)
    repository = tmp_path / "models"
    assert main(["export", "--weights", str(seeded_weights), "--repository", str(repository), "--format",
                 "torchscript", "--precision", "fp32,int8", "--calibration", str(photos)]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    metadata = json.loads((repository / "resnet18" / "1" / "model.json").read_text())
    int8 = next(a for a in metadata["artefacts"] if a["precision"] == "int8")
    assert int8["validation"]["photos"] == len(photo_jpegs) and 0 <= int8["validation"]["top1_agreement"] <= 1
    assert int8["calibration"] and int8["int8_backend"] == "x86"
    assert (repository / "resnet18" / "1" / "model.int8.pt").stat().st_size < (
        repository / "resnet18" / "1" / "model.fp32.pt").stat().st_size / 2  # INT8 weights take a quarter


def test_two_workers_serve_one_runtime_and_metrics_add_up_across_them(
    seeded_weights: Path, tmp_path: Path, photo_jpegs: dict[str, bytes]
) -> None:
    """``make run --workers 2`` on a machine new to it: the workers export the built-in model
    once, time the runtimes once and serve the same one, and /metrics counts both."""
    log = tmp_path / "server.log"
    with real_server(log, weights=str(seeded_weights), allow_download="false", workers="2", torch_threads="1",
                     cache_size="0", runtime="auto", compiled_cache="true",
                     compiled_cache_dir=str(tmp_path / "cache")) as (url, process):
        # Both workers share one socket, so /health/ready answers for whichever accepts; while one
        # compiles, the other can take every probe. Each worker logs when it is ready.
        deadline = time.monotonic() + 240
        while log.read_text().count("resnet_serve.service [-] ready: ") < 2:
            assert process.poll() is None and time.monotonic() < deadline, "a worker never became ready"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60, headers={"Connection": "close"}) as client:
            for _ in range(8):
                response = client.post("/predict", files={"file": ("a.jpg", photo_jpegs["rocket"], "image/jpeg")})
                assert response.status_code == 200
            text = client.get("/metrics").text
        line = next(line for line in text.splitlines()
                    if line.startswith('resnet_serve_requests_total{method="POST",route="/predict",status="200"}'))
        assert float(line.rsplit(" ", 1)[1]) == 8
        assert 'resnet_serve_batch_size_count{model="resnet18"} 8.0' in text
    assert process.returncode == 0  # stopped by SIGTERM after serving: a clean stop
    lines = log.read_text().splitlines()
    assert sum("is faster on this machine" in line for line in lines) == 1
    served = {line.split("loaded resnet18/1 (", 1)[1].split(" ", 1)[0] for line in lines if "loaded resnet18/1 (" in line}
    assert len(served) == 1, served
