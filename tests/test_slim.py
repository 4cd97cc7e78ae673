"""The slim install: ``pip install .`` in a fresh virtualenv has no torch; it serves a repository
exported by the full install through ONNX Runtime, never maps libtorch, and answers as the
TorchScript runtime does; so does ``pip install '.[openvino]'`` through OpenVINO. What needs torch
says which extra brings it."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from resnet_serve.loading import load_engine
from resnet_serve.repository import ModelMetadata, Repository, write_metadata
from resnet_serve.settings import Settings
from resnet_serve.transform import preprocess
from tests.conftest import env_with, free_port, real_server, wait_ready

EXTRA = "pip install 'resnet-serve[torch]'"


def run_slim(python: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], env=env_with(runtime="auto", **settings), capture_output=True,
                          text=True, timeout=300)


def test_the_slim_install_has_no_torch(slim_python: Path) -> None:
    found = run_slim(slim_python, "-c", "import importlib.util as u; print([m for m in ('torch', 'torchvision', "
                                        "'onnx', 'triton') if u.find_spec(m)], u.find_spec('onnxruntime') is not None)")
    assert found.stdout.split() == ["[]", "True"], found.stderr
    installed = run_slim(slim_python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "torch" not in installed and "nvidia" not in installed and "onnxruntime==" in installed
    assert "openvino" not in installed


def test_the_openvino_extra_adds_openvino_and_no_torch(openvino_python: Path) -> None:
    installed = run_slim(openvino_python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "torch" not in installed and "nvidia" not in installed and "onnx==" not in installed
    assert "onnxruntime==" in installed and "openvino==" in installed


INSTALLS = {"onnxruntime": ("slim_python", "onnxruntime_onnx"), "openvino": ("openvino_python", "openvino")}


@pytest.fixture(params=list(INSTALLS))
def slim_server(request: pytest.FixtureRequest, user_repository: Path,
                tmp_path: Path) -> Iterator[tuple[str, int, str]]:
    """A torch-free server: ``pip install .`` (ONNX Runtime) or ``pip install '.[openvino]'`` with
    OpenVINO configured (``RUNTIME=auto`` there would choose by speed)."""
    runtime = request.param
    python = request.getfixturevalue(INSTALLS[runtime][0])
    with real_server(tmp_path / "slim.log", "--model-repository", str(user_repository), python=python,
                     runtime="auto" if runtime == "onnxruntime" else runtime,
                     compiled_cache_dir=str(tmp_path / "cache")) as (url, process):
        wait_ready(url, process)
        yield url, process.pid, runtime


def test_the_slim_server_maps_no_libtorch_and_answers_as_torchscript(
    slim_server: tuple[str, int, str], user_repository: Path, photo_jpegs: dict[str, bytes]
) -> None:
    url, pid, runtime = slim_server
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert f"lib{runtime}" in maps and "libtorch" not in maps and "torch/lib" not in maps
    photos = [photo_jpegs[n] for n in ("chelsea", "coffee", "rocket", "astronaut", "horse")]
    for name, version in Repository(user_repository).latest().items():
        model = httpx.get(f"{url}/model", params={"model": name}).json()
        assert (model["runtime"], model["platform"], model["torch_version"]) == (runtime, INSTALLS[runtime][1], None)
        body = {"inputs": [{"name": "INPUT", "shape": [len(photos)], "datatype": "BYTES",
                            "data": [base64.b64encode(p).decode() for p in photos]}]}
        (output,) = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60).json()["outputs"]
        slim = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        engine = load_engine(version, Settings(runtime="torchscript", device="cpu", compiled_cache=False))
        try:
            import asyncio

            pixels = [preprocess(p, version.spec, max_pixels=10**9).pixels for p in photos]  # type: ignore[arg-type]
            torchscript = np.stack([p.probs for p in asyncio.run(engine.predict(pixels))])
        finally:
            engine.close()
        assert (slim.argmax(1) == torchscript.argmax(1)).all()
        assert np.abs(slim - torchscript).max() <= 1e-4


def test_auto_times_the_runtimes_in_a_child_so_the_server_maps_only_the_one_it_chose(
    openvino_python: Path, user_repository: Path, tmp_path: Path
) -> None:
    """``pip install '.[openvino]'`` with ``RUNTIME=auto`` on a first start: both runtimes are
    timed, and the server process holds only the libraries of the runtime the model chose."""
    repository = tmp_path / "one-model"
    shutil.copytree(user_repository / "flowers", repository / "flowers")
    with real_server(tmp_path / "auto.log", "--model-repository", str(repository), python=openvino_python,
                     runtime="auto", compiled_cache_dir=str(tmp_path / "cache")) as (url, process):
        wait_ready(url, process)
        model = httpx.get(f"{url}/model").json()
        maps = Path(f"/proc/{process.pid}/maps").read_text()
    assert model["runtime_reason"].startswith("timed now") and "onnxruntime" in model["runtime_reason"], model
    assert "openvino" in model["runtime_reason"]
    for runtime in ("onnxruntime", "openvino"):
        assert (f"lib{runtime}" in maps) == (runtime == model["runtime"]), (runtime, model["runtime"])


@pytest.fixture
def repository_with_a_model_cam_cannot_explain(user_repository: Path, tmp_path: Path) -> Path:
    """The users' repository, plus a copy of flowers whose metadata has no CAM head."""
    repository = tmp_path / "repository"
    shutil.copytree(user_repository, repository)
    shutil.copytree(repository / "flowers", repository / "nocam")
    folder = repository / "nocam" / "1"
    metadata = ModelMetadata.model_validate_json((folder / "model.json").read_text())
    write_metadata(folder, metadata.model_copy(update={"name": "nocam", "artefacts": [
        a for a in metadata.artefacts if a.format != "cam"]}))
    return repository


def test_the_slim_install_explains_with_cam_where_the_head_allows_and_else_names_the_extra(
    slim_python: Path, repository_with_a_model_cam_cannot_explain: Path, photo_jpegs: dict[str, bytes], tmp_path: Path
) -> None:
    with real_server(tmp_path / "slim.log", "--model-repository", str(repository_with_a_model_cam_cannot_explain),
                     python=slim_python, runtime="auto", compiled_cache_dir=str(tmp_path / "cache")) as (url, process):
        wait_ready(url, process)
        photo = {"file": ("cat.jpg", photo_jpegs["chelsea"])}
        answer = httpx.post(f"{url}/explain", params={"model": "flowers", "top_k": 2}, files=photo, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["method"], body["layer"], len(body["explanations"])) == ("cam", "layer4", 2)
        heatmap = Image.open(io.BytesIO(base64.b64decode(body["explanations"][0]["heatmap_png"])))
        assert heatmap.size == (451, 300)
        refused = httpx.post(f"{url}/explain", params={"model": "nocam"}, files=photo, timeout=30)
        assert refused.status_code == 501 and refused.json()["error"]["code"] == "explanations_unavailable"
        assert "resnet-serve[torch]" in refused.json()["error"]["message"]
        assert httpx.post(f"{url}/predict", params={"model": "nocam"}, files=photo).status_code == 200
        assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()  # CAM needed no torch


def test_what_needs_torch_names_the_extra(slim_python: Path, user_repository: Path, tmp_path: Path) -> None:
    export = run_slim(slim_python, "-m", "resnet_serve", "export", "--repository", str(tmp_path))
    assert export.returncode == 2 and EXTRA in export.stderr
    serve = run_slim(slim_python, "-m", "resnet_serve", "serve", "--port", str(free_port()),
                     compiled_cache_dir=str(tmp_path / "empty"))  # the built-in model must be exported first
    assert serve.returncode == 3 and f"cannot start: the built-in resnet18 must be exported once, which needs torch ({EXTRA})" in serve.stderr
    assert "Traceback" not in serve.stderr
    torchscript = run_slim(slim_python, "-c", "\n".join([
        "from pathlib import Path",
        "from resnet_serve.loading import load_engine",
        "from resnet_serve.repository import Repository",
        "from resnet_serve.settings import Settings",
        f"version = Repository(Path({str(user_repository)!r})).latest()['flowers']",
        "load_engine(version, Settings(runtime='torchscript'))"]))
    assert torchscript.returncode != 0 and EXTRA in torchscript.stderr


def test_an_iphone_photo_on_an_install_without_the_heif_extra_names_it(
    slim_python: Path, photos: dict[str, Image.Image], tmp_path: Path
) -> None:
    heic = tmp_path / "IMG_0001.HEIC"
    photos["chelsea"].save(heic, "HEIF")  # this (dev) install has the extra
    script = ("import sys\nfrom resnet_serve.decode import decode\nfrom resnet_serve.errors import ServeError\n"
              "try:\n    decode(open(sys.argv[1], 'rb').read(), resize_size=256, max_pixels=10**8)\n"
              "except ServeError as exc:\n    print(exc.status_code, exc.message)\n")
    answer = run_slim(slim_python, "-c", script, str(heic))
    expected = "415 HEIC/HEIF photos need the heif extra on the server: pip install 'resnet-serve[heif]'"
    assert answer.stdout.strip() == expected, answer.stderr


def test_the_slim_server_serves_int8_without_the_photos_the_export_calibrated_on(
    slim_python: Path, seeded_weights: Path, tmp_path: Path, photo_jpegs: dict[str, bytes]
) -> None:
    from resnet_serve.backends import amx_usable
    from resnet_serve.cli import main

    repository = tmp_path / "models"
    assert main(["export", "--weights", str(seeded_weights), "--repository", str(repository), "--format", "onnx",
                 "--precision", "int8"]) == 0
    with real_server(tmp_path / "slim.log", "--model-repository", str(repository), "--precision", "int8",
                     python=slim_python, runtime="auto") as (url, process):
        wait_ready(url, process)
        answer = httpx.post(f"{url}/predict", files={"file": ("a.jpg", photo_jpegs["horse"])})
        assert answer.status_code == 200 and answer.json()["predictions"]
        model = httpx.get(f"{url}/model").json()
        assert (model["runtime"], model["precision"]) == ("onnxruntime", "int8")
    # without the onnx package: the GEMM patch is appended as bytes, on a CPU with AMX only
    patched = "INT8 convolutions run ONNX Runtime's INT8 GEMM (this CPU has AMX)" in (tmp_path / "slim.log").read_text()
    assert patched == amx_usable()


def test_the_slim_server_serves_the_built_in_int8_model_the_full_install_exported_on_this_machine(
    slim_python: Path, seeded_weights: Path, tmp_path: Path, photo_jpegs: dict[str, bytes]
) -> None:
    """No repository: the built-in model, exported into the cache by the full install (with the
    photos scikit-image ships, which the slim install has not) and then served by the slim one,
    which can neither read those photos nor export, so it serves the artefact as built."""
    from resnet_serve.loading import open_model

    cache = tmp_path / "cache"
    full = Settings(weights=seeded_weights, compiled_cache_dir=cache, device="cpu", runtime="onnxruntime",
                    precision="int8")
    engine = open_model(full)
    try:
        import asyncio

        pixels = preprocess(photo_jpegs["horse"], engine.info.spec, max_pixels=10**9).pixels
        (expected,) = asyncio.run(engine.predict([pixels]))
    finally:
        engine.close()
    with real_server(tmp_path / "slim.log", python=slim_python, runtime="auto", precision="int8",
                     weights=str(seeded_weights), compiled_cache="true", compiled_cache_dir=str(cache)) as (url, process):
        wait_ready(url, process)
        model = httpx.get(f"{url}/model").json()
        body = {"inputs": [{"name": "INPUT", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(photo_jpegs["horse"]).decode()]}]}
        (output,) = httpx.post(f"{url}/v2/models/resnet18/infer", json=body, timeout=60).json()["outputs"]
    assert (model["runtime"], model["precision"], model["compiled_from"]) == ("onnxruntime", "int8", "repository"), model
    assert np.abs(np.asarray(output["data"], dtype=np.float32) - expected.probs).max() <= 1e-5


def test_bulk_classification_through_a_server_names_the_client_extra(slim_python: Path, tmp_path: Path,
                                                                      photo_jpegs: dict[str, bytes]) -> None:
    (tmp_path / "a.jpg").write_bytes(photo_jpegs["coffee"])
    done = run_slim(slim_python, "-m", "resnet_serve", "predict", str(tmp_path / "a.jpg"), "--server",
                    "http://127.0.0.1:9")
    assert done.returncode == 2 and "pip install 'resnet-serve[client]'" in done.stderr
