"""Shared fixtures: real photos, a seeded weights file in the official format, a real engine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage
import torch
from asgi_lifespan import LifespanManager
from PIL import Image

from resnet_serve.backends.torch.checkpoints import load_state_dict
from resnet_serve.backends.torch.graph import build_network, build_network_of
from resnet_serve.http.app import create_app
from resnet_serve.inference import Engine
from resnet_serve.loading import open_model
from resnet_serve.settings import Settings
from resnet_serve.spec import RESNET18
from resnet_serve.transform import preprocess
from resnet_serve.weights import sha256_of

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from venvs import torch_free_python  # noqa: E402

TEST_SEED = 1234
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
# Real photographs shipped inside scikit-image (a dev dependency), not committed here.
PHOTO_FILES = {
    "chelsea": "chelsea.png",  # a tabby cat
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "retina": "retina.jpg",
    "hubble": "hubble_deep_field.jpg",
    "horse": "horse.png",
}


def as_jpeg(image: Image.Image, quality: int = 90, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality, **save_args)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session", autouse=True)
def compiled_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Compiled models built by in-process tests go to a temporary folder, not ~/.cache."""
    folder = tmp_path_factory.mktemp("compiled")
    previous = os.environ.get("RESNET_SERVE_COMPILED_CACHE_DIR")
    os.environ["RESNET_SERVE_COMPILED_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["RESNET_SERVE_COMPILED_CACHE_DIR"]
    else:
        os.environ["RESNET_SERVE_COMPILED_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """The real photos, decoded to RGB."""
    return {name: Image.open(SKIMAGE_DATA / f).convert("RGB") for name, f in PHOTO_FILES.items()}


@pytest.fixture(scope="session")
def photo_jpegs(photos: dict[str, Image.Image]) -> dict[str, bytes]:
    """The real photos as JPEG uploads, the way a phone or browser sends them."""
    return {name: as_jpeg(image) for name, image in photos.items()}


def write_seeded_weights(directory: Path, seed: int = TEST_SEED) -> Path:
    """A randomly initialised ResNet-18 state_dict in the official file format and naming
    (``resnet18-<first 8 hex of its SHA-256>.pth``), so the real loading path is exercised."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    state_dict = build_network(RESNET18).state_dict()
    torch.random.set_rng_state(generator_state)
    staging = directory / "staging.pth"
    torch.save(state_dict, staging)
    final = directory / f"resnet18-{sha256_of(staging)[:8]}.pth"
    staging.rename(final)
    return final


@pytest.fixture(scope="session")
def seeded_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_seeded_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def settings(seeded_weights: Path) -> Settings:
    return Settings(weights=seeded_weights, allow_download=False, device="cpu", torch_threads=2,
                    compiled_cache=False, runtime="torchscript")


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    """One real TorchScript engine for the whole session (tracing and warm-up take seconds)."""
    engine = open_model(settings)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def reference_model(seeded_weights: Path) -> torch.nn.Module:
    """Plain eager torchvision ResNet-18 with the same weights, for parity checks."""
    model = build_network(RESNET18)
    model.load_state_dict(load_state_dict(seeded_weights, RESNET18))
    return model.eval()


FLOWERS = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
PARTS = {"0": "bolt", "1": "nut", "2": "washer"}


def random_state_dict(architecture: str, classes: int, seed: int) -> dict[str, torch.Tensor]:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    state_dict = build_network_of(architecture, classes).state_dict()
    torch.random.set_rng_state(generator_state)
    return state_dict


@pytest.fixture(scope="session")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What users bring: a 5-class ResNet-18 saved from DataParallel inside a training checkpoint
    with labels.txt, and a 3-class MobileNetV3-Small saved after torch.compile with labels.json."""
    folder = tmp_path_factory.mktemp("user")
    flowers = random_state_dict("resnet18", 5, seed=5)
    torch.save({"epoch": 12, "state_dict": {f"module.{k}": v for k, v in flowers.items()}}, folder / "flowers.pth")
    (folder / "flowers.txt").write_text("\n".join(FLOWERS) + "\n")
    parts = random_state_dict("mobilenet_v3_small", 3, seed=3)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in parts.items()}}, folder / "parts.pt")
    (folder / "parts.json").write_text(json.dumps(PARTS))
    seven = random_state_dict("resnet18", 7, seed=7)
    torch.save(seven, folder / "seven.pth")
    return {"flowers": folder / "flowers.pth", "flowers_labels": folder / "flowers.txt",
            "parts": folder / "parts.pt", "parts_labels": folder / "parts.json", "seven": folder / "seven.pth"}


@pytest.fixture(scope="session")
def user_repository(user_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both user models exported into one repository (TorchScript and ONNX, FP32); flowers
    batches up to 2, as its metadata says."""
    from resnet_serve.cli import main

    repository = tmp_path_factory.mktemp("repository")
    assert main(["export", "--arch", "resnet18", "--weights", str(user_files["flowers"]), "--labels",
                 str(user_files["flowers_labels"]), "--name", "flowers", "--repository", str(repository),
                 "--max-batch-size", "2"]) == 0
    assert main(["export", "--arch", "mobilenet_v3_small", "--weights", str(user_files["parts"]), "--labels",
                 str(user_files["parts_labels"]), "--name", "parts", "--repository", str(repository)]) == 0
    return repository


@pytest.fixture(scope="session")
def slim_python() -> Path:
    """``pip install .``: the slim server."""
    return torch_free_python()


@pytest.fixture(scope="session")
def openvino_python() -> Path:
    """``pip install '.[openvino]'``: the slim server with OpenVINO, still without torch."""
    return torch_free_python("openvino")


async def probs_of(engine: Engine, uploads: list[bytes]) -> torch.Tensor:
    """What the model says for each upload in-process, as one batch: ``[N, classes]``."""
    pixels = [preprocess(data, RESNET18, max_pixels=10**9).pixels for data in uploads]
    return torch.from_numpy(np.stack([p.probs for p in await engine.predict(pixels)]))


async def open_client(app: object) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            yield c


async def until_ready(client: httpx.AsyncClient, tries: int = 600) -> None:
    """Poll ``/health/ready`` every 0.1 s until it answers 200 (or ``tries`` run out: the caller's
    own assertions then say what is wrong)."""
    for _ in range(tries):
        if (await client.get("/health/ready")).status_code == 200:
            return
        await asyncio.sleep(0.1)


async def ready_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app made from ``settings``, once its models are loaded."""
    async for client in open_client(create_app(settings)):
        await until_ready(client)
        yield client


@pytest.fixture
async def client(settings: Settings, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The real app around the shared engine, through httpx's ASGI transport."""
    async for c in open_client(create_app(settings, engine=engine)):
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_with(**values: str) -> dict[str, str]:
    """This process's environment without RESNET_SERVE_* variables, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
    env["RESNET_SERVE_COMPILED_CACHE"] = "false"  # tests leave ~/.cache alone unless they ask
    env["RESNET_SERVE_RUNTIME"] = "torchscript"  # the design's runtime, unless a test picks another
    env.update({f"RESNET_SERVE_{k.upper()}": v for k, v in values.items()})
    return env


def wait_ready(base: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert process.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


@contextlib.contextmanager
def real_server(log: Path, *flags: str, python: Path | None = None,
                **settings: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real ``resnet-serve serve`` process on a free loopback port (not waited for), with
    command-line ``flags`` and ``RESNET_SERVE_*`` ``settings``, run by ``python`` (default: this
    interpreter; a torch-free venv's for the slim installs)."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(python or sys.executable), "-m", "resnet_serve", "serve", "--port", str(port), *flags],
            env=env_with(**settings), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains and stops its uvicorn workers), then SIGKILL to the whole
    process group, so no worker outlives the test."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
