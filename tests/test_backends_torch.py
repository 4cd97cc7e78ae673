"""The torch backend: device and precision choice, the compiled graph's numbers, batching
invariance, INT8, BF16, FP16, the compiled-model cache, and ONNX Runtime parity."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from resnet_serve.backends.torch.checkpoints import resolve
from resnet_serve.backends.torch.compile import CompileOptions, compile_model
from resnet_serve.backends.torch.runtime import select_device, select_precision
from resnet_serve.errors import RepositoryError
from resnet_serve.inference import Engine, Prediction
from resnet_serve.loading import open_model, wanted_for
from resnet_serve.photos import CalibrationError, calibration_files
from resnet_serve.settings import Settings
from resnet_serve.spec import RESNET18
from resnet_serve.transform import preprocess


def random_pixels(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=generator)


def stacked(predictions: list[Prediction]) -> torch.Tensor:
    return torch.from_numpy(np.stack([p.probs for p in predictions]))


def test_auto_picks_the_cpu_when_nothing_else_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # so it runs on GPU hosts too
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no cuda device"):
        select_device("cuda")


def test_precision_defaults() -> None:
    assert select_precision("auto", torch.device("cpu")) == "fp32"
    assert select_precision("auto", torch.device("cuda")) == "fp16"
    assert select_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(RuntimeError, match="fp16"):
        select_precision("fp16", torch.device("cpu"))


async def test_the_graph_normalises_like_torchvision_and_returns_probabilities(
    engine: Engine, reference_model: nn.Module
) -> None:
    pixels = random_pixels(2)
    mean = torch.tensor(RESNET18.mean).view(1, 3, 1, 1)
    std = torch.tensor(RESNET18.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(reference_model((pixels.float() / 255 - mean) / std), dim=1)
    got = stacked(await engine.predict(list(pixels.numpy())))
    assert got.dtype == torch.float32 and got.shape == (2, 1000)
    assert torch.allclose(got.sum(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)


async def test_a_batched_answer_equals_the_single_answer(engine: Engine) -> None:
    pixels = list(random_pixels(4, seed=1).numpy())
    together = await engine.predict(pixels)
    alone = [(await engine.predict([p]))[0] for p in pixels]
    assert [p.batch_size for p in together] == [4] * 4 and alone[0].batch_size == 1
    for batched, single in zip(together, alone):
        assert np.allclose(batched.probs, single.probs, atol=1e-5)


def test_warmup_ran_every_batch_size(engine: Engine, settings: object) -> None:
    assert sorted(engine.info.warmup_batch_ms) == list(range(1, 5))
    assert engine.info.device == "cpu" and engine.info.precision == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CI has none)")
async def test_cuda_fp16_matches_cpu_fp32(seeded_weights: Path) -> None:
    gpu_settings = Settings(weights=seeded_weights, device="cuda", allow_download=False)
    gpu = open_model(gpu_settings)
    cpu = open_model(gpu_settings.model_copy(update={"device": "cpu"}))
    try:
        assert gpu.info.precision == "fp16" and gpu.info.device.startswith("cuda")
        pixels = list(random_pixels(4, seed=2).numpy())
        on_gpu, on_cpu = await gpu.predict(pixels), await cpu.predict(pixels)
        for a, b in zip(on_gpu, on_cpu):
            assert np.allclose(a.probs, b.probs, atol=2e-3)
    finally:
        gpu.close()
        cpu.close()


def test_the_fp16_graph_a_gpu_runs_tracks_fp32(settings: Settings, reference_model: nn.Module) -> None:
    """CI has no GPU: the graph CUDA and MPS get (half weights, uint8 in, normalisation in half,
    softmax in float) is built and run on the CPU here, which torch can also do in fp16."""
    weights = resolve(RESNET18, settings)
    options = CompileOptions(precision="fp16", channels_last=True)
    half = compile_model(RESNET18, weights, options)
    pixels = random_pixels(2, seed=3)
    mean = torch.tensor(RESNET18.mean).view(1, 3, 1, 1)
    std = torch.tensor(RESNET18.std).view(1, 3, 1, 1)
    with torch.no_grad():
        got = half(pixels)
        expected = torch.softmax(reference_model((pixels.float() / 255 - mean) / std), dim=1)
    assert got.dtype == torch.float32 and got.shape == (2, 1000)
    assert torch.allclose(got.sum(dim=1), torch.ones(2), atol=1e-3)
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.99
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


def load(settings: Settings, **changes: object) -> Engine:
    return open_model(settings.model_copy(update=changes))


def photo_pixels(photo_jpegs: dict[str, bytes]) -> list[np.ndarray]:
    return [preprocess(data, RESNET18, max_pixels=10**9).pixels for data in photo_jpegs.values()]


async def test_int8_is_calibrated_on_real_photos_and_tracks_fp32(
    settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    int8 = load(settings, precision="int8", max_batch_size=2)
    try:
        assert int8.info.precision == "int8" and not int8.info.channels_last
        pixels = photo_pixels(photo_jpegs)
        quantized = stacked(await int8.predict(pixels))
        reference = stacked(await engine.predict(pixels))
        assert torch.allclose(quantized.sum(dim=1), torch.ones(len(pixels)), atol=1e-4)
        assert torch.nn.functional.cosine_similarity(quantized, reference).min() > 0.99
        overlap = [len(set(q.topk(5).indices.tolist()) & set(r.topk(5).indices.tolist()))
                   for q, r in zip(quantized, reference)]
        assert sum(overlap) / (5 * len(overlap)) >= 0.6
    finally:
        int8.close()


async def test_bf16_on_the_cpu_uses_channels_last_and_tracks_fp32(
    settings: Settings, engine: Engine, photo_jpegs: dict[str, bytes]
) -> None:
    bf16 = load(settings, precision="bf16", max_batch_size=1)
    try:
        assert bf16.info.precision == "bf16" and bf16.info.channels_last
        pixels = photo_pixels(photo_jpegs)
        half = stacked(await bf16.predict(pixels))
        reference = stacked(await engine.predict(pixels))
        assert half.dtype == torch.float32
        assert torch.allclose(half.sum(dim=1), torch.ones(len(pixels)), atol=1e-4)
        assert torch.nn.functional.cosine_similarity(half, reference).min() > 0.99
    finally:
        bf16.close()


def test_int8_refuses_a_gpu_and_needs_calibration_images(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="CPU only"):
        select_precision("int8", torch.device("cuda"))
    with pytest.raises(CalibrationError, match="no images"):
        calibration_files(tmp_path)


def test_what_the_default_model_is_built_with_decides_the_artefact_wanted(
    settings: Settings, tmp_path: Path, photo_jpegs: dict[str, bytes]
) -> None:
    (tmp_path / "a.jpg").write_bytes(photo_jpegs["chelsea"])
    int8 = settings.model_copy(update={"precision": "int8"})
    wanted = {wanted_for("torchscript", s, built_here=True) for s in (
        int8, int8.model_copy(update={"calibration_dir": tmp_path}), int8.model_copy(update={"int8_backend": "fbgemm"}),
        settings, settings.model_copy(update={"channels_last": False}))}
    assert len(wanted) == 5
    assert wanted_for("onnxruntime", int8, built_here=True) != wanted_for(
        "onnxruntime", int8.model_copy(update={"calibration_dir": tmp_path}), built_here=True)


async def test_the_default_model_is_exported_once_into_the_cache_and_reused(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cached = {"compiled_cache": True, "compiled_cache_dir": tmp_path, "max_batch_size": 1}
    first = load(settings, **cached)
    pixels = [random_pixels(1, seed=3)[0].numpy()]
    expected = (await first.predict(pixels))[0].probs
    first.close()
    artefacts = list((tmp_path / "repository" / "resnet18" / "1").glob("model.fp32.pt"))
    assert first.info.compiled_from == "exported" and len(artefacts) == 1
    assert (tmp_path / "repository" / "resnet18" / "1" / "model.fp32.state_dict.pt").is_file()  # for /explain
    second = load(settings, **cached)
    try:
        assert second.info.compiled_from == "repository"
        assert np.allclose((await second.predict(pixels))[0].probs, expected, atol=1e-6)
    finally:
        second.close()
    artefacts[0].write_bytes(b"damaged")
    with caplog.at_level("WARNING"):
        third = load(settings, **cached)
    third.close()
    assert third.info.compiled_from == "exported" and "exporting it again" in caplog.text


async def test_the_onnxruntime_runtime_matches_torchscript(settings: Settings, engine: Engine, tmp_path: Path) -> None:
    ort = load(settings, runtime="onnxruntime", compiled_cache=True, compiled_cache_dir=tmp_path, max_batch_size=2)
    try:
        assert ort.info.runtime == "onnxruntime" and ort.info.platform == "onnxruntime_onnx"
        pixels = list(random_pixels(3, seed=4).numpy())
        ours = stacked(await ort.predict(pixels))
        reference = stacked(await engine.predict(pixels))
        assert torch.allclose(ours, reference, atol=1e-5)
        assert list(tmp_path.glob("repository/resnet18/1/*.onnx"))
    finally:
        ort.close()
    with pytest.raises(RepositoryError, match="FP32 or INT8 on the CPU"):
        load(settings, runtime="onnxruntime", precision="bf16")


async def test_two_torchscript_instances_answer_at_once_as_one_does(settings: Settings, engine: Engine) -> None:
    """RESNET_SERVE_INSTANCES=2: two inference threads share the frozen graph, each with its
    share of the torch threads, and concurrent batches get the one-instance answers."""
    two = load(settings, instances=2, torch_threads=2)
    try:
        assert (two.info.instances, two.info.threads) == (2, 2)
        batches = [list(random_pixels(2, seed=s).numpy()) for s in range(6)]
        together = await asyncio.gather(*(two.predict(b) for b in batches))
        for batch, answers in zip(batches, together, strict=True):
            expected = await engine.predict(batch)
            for got, want in zip(answers, expected, strict=True):
                assert np.allclose(got.probs, want.probs, atol=1e-5)
    finally:
        two.close()
