"""Loading: which runtimes may serve, which one is chosen and how the choice is kept, ONNX
Runtime's cached optimised graph, and INT8 through ONNX Runtime."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_serve import loading
from resnet_serve.backends.onnxruntime import (
    KEPT_GRAPH,
    KEPT_WEIGHTS,
    RUNTIME_VERSION,
    STALE_SCRATCH_S,
    OnnxRuntimeBackend,
)
from resnet_serve.cli import main
from resnet_serve.errors import RepositoryError
from resnet_serve.loading import candidate_runtimes, choose_runtime, load_engine
from resnet_serve.repository import Repository
from resnet_serve.settings import Settings
from resnet_serve.transform import preprocess


def cpu(**changes: object) -> Settings:
    return Settings(device="cpu", torch_threads=1, ort_threads=1, **changes)  # type: ignore[arg-type]


def test_auto_takes_every_installed_runtime_that_can_run_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert candidate_runtimes(cpu()) == ["torchscript", "onnxruntime", "openvino"]
    assert candidate_runtimes(cpu(precision="bf16")) == ["torchscript", "openvino"]  # ONNX Runtime: FP32, INT8
    assert candidate_runtimes(cpu(precision="fp16")) == ["torchscript"]
    assert candidate_runtimes(cpu(runtime="onnxruntime")) == ["onnxruntime"]
    real = importlib.util.find_spec
    missing: set[str] = {"torch"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in missing else real(name))
    assert candidate_runtimes(cpu()) == ["onnxruntime", "openvino"]  # pip install '.[openvino]'
    assert candidate_runtimes(cpu(precision="bf16")) == ["openvino"]
    missing.add("openvino")
    assert candidate_runtimes(cpu()) == ["onnxruntime"]  # the slim install
    with pytest.raises(RepositoryError, match=r"needs torch .*\[torch\]'\), or OpenVINO .*\[openvino\]'"):
        candidate_runtimes(cpu(precision="bf16"))


@pytest.fixture
def both(user_repository: Path) -> loading.ModelVersion:
    """flowers, with TorchScript and ONNX FP32 artefacts."""
    return Repository(user_repository).latest()["flowers"]


def test_an_install_that_can_export_needs_the_calibration_photos_for_the_built_in_int8_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the slim install, which cannot export, serves an INT8 artefact whose photos it cannot
    check (tests/test_slim.py); with torch, missing photos stop the start, as does an empty folder."""
    from resnet_serve.photos import CalibrationError

    def no_photos(directory: Path | None) -> list[Path]:
        raise CalibrationError("no photos")

    with pytest.raises(CalibrationError, match="no images"):
        loading.wanted_for("onnxruntime", cpu(precision="int8", calibration_dir=tmp_path), built_here=True)
    monkeypatch.setattr(loading, "calibration_files", no_photos)
    assert loading.torch_installed()
    with pytest.raises(CalibrationError, match="no photos"):
        loading.wanted_for("onnxruntime", cpu(precision="int8"), built_here=True)


@pytest.mark.parametrize(("timings", "expected"), [
    ((10.0, 5.0, 8.0), "onnxruntime"),
    ((5.0, 10.0, 10.0), "torchscript"),
    ((10.4, 10.0, 10.2), "torchscript"),  # a tie within 5%: TorchScript, the design's runtime
    ((10.0, 5.2, 5.0), "onnxruntime"),  # ... then ONNX Runtime, the slim install's
    ((10.0, 9.0, 4.0), "openvino"),
])
def test_the_fastest_runtime_is_chosen_the_first_one_on_a_tie(
    both: loading.ModelVersion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    timings: tuple[float, float, float], expected: str,
) -> None:
    """The rule, with the timings given (the real timing is exercised below)."""
    ms = dict(zip(["torchscript", "onnxruntime", "openvino"], timings, strict=True))
    monkeypatch.setattr(loading, "_timings", lambda version, present, settings, batch: ms)
    choice = choose_runtime(both, cpu(compiled_cache_dir=tmp_path))
    assert choice.wanted.runtime == expected and choice.reason == f"timed now: {ms}"


def three_workers_choose(version: loading.ModelVersion, settings: Settings) -> list[loading.Choice]:
    """Three workers of one server choosing the runtime at the same moment (threads here)."""
    together = threading.Barrier(3)

    def worker(_: int) -> loading.Choice:
        together.wait()
        return choose_runtime(version, settings)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return list(pool.map(worker, range(3)))


def test_when_timing_fails_the_first_runtime_in_tie_order_serves_and_the_next_start_times_again(
    both: loading.ModelVersion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The child that times the runtimes dies (as a runtime crashing on this CPU would take it):
    the server still starts, says why, and a later start times again."""
    real_run = loading.subprocess.run
    children: list[int] = []

    def dying(command: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        children.append(1)
        return real_run([command[0], "-c", "import os; os.abort()"], **kw)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(loading.subprocess, "run", dying)
    settings = cpu(compiled_cache_dir=tmp_path)
    choice = choose_runtime(both, settings)
    assert choice.wanted.runtime == "torchscript" and choice.reason.startswith("timing the runtimes failed, so")
    assert "exit code -6" in caplog.text and len(children) == 1
    monkeypatch.setattr(loading, "FAILED_TIMING_KEPT_S", -1.0)  # the next start, long after
    assert choose_runtime(both, settings).reason.startswith("timing the runtimes failed, so") and len(children) == 2


def test_workers_starting_together_share_a_failed_timing_rather_than_time_again_in_turn(
    both: loading.ModelVersion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first worker's timing fails; the two waiting on it fall back as it did, without
    timing again one after the other (where a second try that worked could split the server)."""
    timed: list[int] = []

    def failing_then_working(version: object, present: object, settings: object, batch: int) -> dict[str, float] | None:
        timed.append(1)
        time.sleep(0.3)
        return None if len(timed) == 1 else {"torchscript": 10.0, "onnxruntime": 5.0, "openvino": 8.0}

    monkeypatch.setattr(loading, "_timings", failing_then_working)
    choices = three_workers_choose(both, cpu(compiled_cache_dir=tmp_path))
    assert len(timed) == 1 and [c.wanted.runtime for c in choices] == ["torchscript"] * 3
    assert sorted(c.reason.split(",")[0] for c in choices) == [
        "timing the runtimes failed", "timing the runtimes failed (in another worker", "timing the runtimes failed (in another worker"]


def test_the_choice_is_timed_once_per_machine_and_kept(both: loading.ModelVersion, tmp_path: Path,
                                                       photo_jpegs: dict[str, bytes]) -> None:
    import asyncio

    settings = cpu(compiled_cache_dir=tmp_path)
    first = load_engine(both, settings)
    try:
        assert first.info.runtime_reason.startswith("timed now")
        kept = json.loads((tmp_path / "runtime-choices.json").read_text())
        ((key, choice),) = kept.items()
        assert loading.cpu_model() in key and set(choice["ms"]) == {"torchscript", "onnxruntime", "openvino"}
        assert choice["runtime"] == first.info.runtime
        pixels = preprocess(photo_jpegs["coffee"], both.spec, max_pixels=10**9).pixels  # type: ignore[arg-type]
        answer = asyncio.run(first.predict([pixels]))[0].probs
    finally:
        first.close()
    second = load_engine(both, settings)
    try:
        assert second.info.runtime_reason.startswith("timed earlier") and second.info.runtime == first.info.runtime
        assert np.allclose(asyncio.run(second.predict([pixels]))[0].probs, answer, atol=1e-6)
    finally:
        second.close()


def test_workers_starting_together_time_the_runtimes_once_and_serve_one_choice(
    both: loading.ModelVersion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three workers find no kept choice at once: one times (here a slow fake timing), the
    others wait for it and take its choice rather than timing beside it and choosing apart."""
    timed: list[int] = []

    def slow_timings(version: object, present: object, settings: object, batch: int) -> dict[str, float]:
        timed.append(1)
        time.sleep(0.5)
        return {"torchscript": 10.0, "onnxruntime": 5.0, "openvino": 8.0}

    monkeypatch.setattr(loading, "_timings", slow_timings)
    choices = three_workers_choose(both, cpu(compiled_cache_dir=tmp_path))
    assert len(timed) == 1
    assert [c.wanted.runtime for c in choices] == ["onnxruntime"] * 3
    assert sorted(c.reason.split(":")[0] for c in choices) == ["timed earlier", "timed earlier", "timed now"]


def test_workers_starting_together_optimise_an_onnx_graph_once(both: loading.ModelVersion, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cold cache, one worker has ONNX Runtime optimise the graph; the others wait and open
    the kept one (before, each optimised its own copy, all at once on the same cores)."""
    from resnet_serve.backends import onnxruntime as ort_backend

    artefact = both.metadata.artefact("onnx", "fp32")  # type: ignore[union-attr]
    assert artefact is not None
    optimised: list[Path] = []
    real = ort_backend._staging
    monkeypatch.setattr(ort_backend, "_staging", lambda folder, options: optimised.append(folder) or real(folder, options))
    settings = cpu(runtime="onnxruntime", compiled_cache_dir=tmp_path)
    together = threading.Barrier(2)

    def worker(_: int) -> np.ndarray:
        together.wait()
        return loading.open_backend("onnxruntime", artefact, both.artefact_path(artefact), settings).run(pixels)

    pixels = np.random.default_rng(2).integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, second = pool.map(worker, range(2))
    assert len(optimised) == 1 and np.array_equal(first, second)


def test_with_runtime_auto_each_artefact_is_hashed_once_per_load(both: loading.ModelVersion, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice checks every candidate's SHA-256, the ONNX one once though two runtimes time it;
    opening the chosen one does not check it again."""
    from collections import Counter

    from resnet_serve import repository

    hashed: Counter[str] = Counter()
    real = repository.sha256_of
    monkeypatch.setattr(repository, "sha256_of", lambda path: hashed.update([path.name]) or real(path))
    settings = cpu(compiled_cache_dir=tmp_path)
    for reason in ("timed now", "timed earlier"):
        hashed.clear()
        engine = load_engine(both, settings)
        engine.close()
        assert engine.info.runtime_reason.startswith(reason)
        assert hashed == Counter({"model.fp32.pt": 1, "model.fp32.onnx": 1})


def test_onnxruntime_keeps_its_optimised_graph_for_the_next_start(both: loading.ModelVersion, tmp_path: Path) -> None:
    """Kept as a folder: the graph, and its weights in a file of their own that the next session
    maps rather than copies; a damaged copy is made again, the scratch folder never left behind."""
    artefact = both.metadata.artefact("onnx", "fp32")  # type: ignore[union-attr]
    assert artefact is not None
    optimised = tmp_path / "optimised"
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    fresh = OnnxRuntimeBackend(both.artefact_path(artefact), threads=1, optimised=optimised)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimised"]
    assert sorted(p.name for p in optimised.iterdir()) == [KEPT_GRAPH, KEPT_WEIGHTS]
    assert (optimised / KEPT_WEIGHTS).stat().st_size > 10 * (optimised / KEPT_GRAPH).stat().st_size
    again = OnnxRuntimeBackend(both.artefact_path(artefact), threads=1, optimised=optimised)
    assert np.array_equal(fresh.run(pixels), again.run(pixels))
    if sys.platform == "linux":
        assert str(optimised / KEPT_WEIGHTS) in Path("/proc/self/maps").read_text()
    (optimised / KEPT_GRAPH).write_bytes(b"damaged")
    repaired = OnnxRuntimeBackend(both.artefact_path(artefact), threads=1, optimised=optimised)
    assert np.array_equal(repaired.run(pixels), fresh.run(pixels))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimised"]
    assert (optimised / KEPT_GRAPH).stat().st_size > 1000


def test_compiled_entries_no_server_opened_for_a_month_are_removed_when_another_is_opened(
    both: loading.ModelVersion, tmp_path: Path
) -> None:
    """The cache keeps one entry per artefact, runtime version and CPU: without pruning it would
    grow with every export and upgrade. Opening an entry marks it used; entries of the same
    runtime unused for STALE_CACHE_ENTRY_S go, with their lock files; recent ones and scratch
    folders stay."""
    artefact = both.metadata.artefact("onnx", "fp32")  # type: ignore[union-attr]
    settings = cpu(runtime="onnxruntime", compiled_cache_dir=tmp_path)
    entries = tmp_path / "onnxruntime"
    entries.mkdir()
    month_ago = time.time() - loading.STALE_CACHE_ENTRY_S - 3600
    for name in ["old-artefact", "recent-artefact", ".model.onnx.scratch"]:
        (entries / name).mkdir()
        (entries / name / "model.onnx").write_bytes(b"kept")
        (entries / f"{name}.lock").touch()
        if name != "recent-artefact":
            os.utime(entries / name, (month_ago, month_ago))
    loading.open_backend("onnxruntime", artefact, both.artefact_path(artefact), settings)  # type: ignore[arg-type]
    opened = loading._compiled_cache(artefact, settings, "onnxruntime", RUNTIME_VERSION)  # type: ignore[arg-type]
    assert opened is not None and time.time() - opened.stat().st_mtime < 60
    left = sorted(p.name for p in entries.iterdir())
    assert left == sorted([".model.onnx.scratch", ".model.onnx.scratch.lock", "recent-artefact",
                           "recent-artefact.lock", opened.name, f"{opened.name}.lock"])
    os.utime(opened, (month_ago, month_ago))  # an entry that is opened again is marked used again
    loading.open_backend("onnxruntime", artefact, both.artefact_path(artefact), settings)  # type: ignore[arg-type]
    assert opened.is_dir() and time.time() - opened.stat().st_mtime < 60


def test_scratch_folders_left_by_a_server_stopped_mid_write_are_removed(both: loading.ModelVersion,
                                                                        tmp_path: Path) -> None:
    artefact = both.metadata.artefact("onnx", "fp32")  # type: ignore[union-attr]
    assert artefact is not None
    optimised = tmp_path / "optimised"
    abandoned, busy = tmp_path / ".optimised.abandoned", tmp_path / ".optimised.busy"
    for folder in (abandoned, busy):
        folder.mkdir()
        (folder / KEPT_WEIGHTS).write_bytes(b"half written")
    long_ago = time.time() - 2 * STALE_SCRATCH_S
    os.utime(abandoned, (long_ago, long_ago))
    OnnxRuntimeBackend(both.artefact_path(artefact), threads=1, optimised=optimised)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".optimised.busy", "optimised"]


def test_a_graph_that_does_not_open_leaves_no_scratch_folder(tmp_path: Path) -> None:
    damaged = tmp_path / "model.onnx"
    damaged.write_bytes(b"not a graph")
    with pytest.raises(Exception, match="(?i)protobuf|load|invalid"):
        OnnxRuntimeBackend(damaged, threads=1, optimised=tmp_path / "cache" / "optimised")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("spinning", [False, True])
def test_onnx_runtime_threads_spin_only_when_the_settings_say_so(both: loading.ModelVersion, tmp_path: Path,
                                                                  spinning: bool) -> None:
    """Sleeping is the default (settled by http_bench); the setting reaches ONNX Runtime both
    when the graph is optimised now and when a restart opens the kept one."""
    assert Settings().ort_spinning is False
    artefact = both.metadata.artefact("onnx", "fp32")  # type: ignore[union-attr]
    assert artefact is not None
    settings = cpu(ort_spinning=spinning, compiled_cache_dir=tmp_path)
    for _ in ("optimised now", "kept"):
        backend = loading.open_backend("onnxruntime", artefact, both.artefact_path(artefact), settings)
        options = backend.session.get_session_options()  # type: ignore[attr-defined]
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    assert len([p for p in (tmp_path / "onnxruntime").iterdir() if p.is_dir()]) == 1


def test_a_session_serving_a_kept_graph_survives_another_server_replacing_it(
    both: loading.ModelVersion, tmp_path: Path
) -> None:
    """The kept weights are mapped: replacing them in place (truncate, write) would crash every
    server that maps them with SIGBUS. A repair moves a new folder in and the old files away."""
    artefact = both.metadata.artefact("onnx", "fp32")  # type: ignore[union-attr]
    assert artefact is not None
    optimised = tmp_path / "optimised"
    pixels = np.random.default_rng(1).integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
    OnnxRuntimeBackend(both.artefact_path(artefact), threads=1, optimised=optimised)
    serving = OnnxRuntimeBackend(both.artefact_path(artefact), threads=1, optimised=optimised)
    before = serving.run(pixels)
    mapped = (optimised / KEPT_WEIGHTS).stat().st_ino
    (optimised / KEPT_GRAPH).write_bytes(b"damaged")  # the next server to start makes it again
    OnnxRuntimeBackend(both.artefact_path(artefact), threads=1, optimised=optimised)
    assert (optimised / KEPT_WEIGHTS).stat().st_ino != mapped
    assert np.array_equal(serving.run(pixels), before)


@pytest.mark.parametrize("damage", ["truncated", "one byte flipped"])
def test_a_damaged_artefact_is_refused_by_its_check_though_it_is_opened_meanwhile(
    user_repository: Path, tmp_path: Path, damage: str
) -> None:
    """The SHA-256 check runs beside the opening: its verdict stands whether the runtime choked on
    the file (truncated) or opened it anyway (a flipped weight, or its optimised graph kept)."""
    copy = tmp_path / "repository"
    shutil.copytree(user_repository, copy)
    version = Repository(copy).latest()["flowers"]
    settings = cpu(runtime="onnxruntime", compiled_cache_dir=tmp_path / "cache")
    wanted = loading.wanted_for("onnxruntime", settings)
    artefact = wanted.pick(version)
    loading.open_verified(version, wanted, settings)  # intact: opens, and keeps the optimised graph
    path = version.directory / artefact.file
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match="fails its SHA-256 check"):
        loading.open_verified(version, wanted, settings)
    path.unlink()
    with pytest.raises(RepositoryError, match="is missing"):
        loading.open_verified(version, wanted, settings)


@pytest.fixture(scope="module")
def onnx_int8(seeded_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> loading.ModelVersion:
    """A repository exported with ONNX FP32 and INT8, as ``resnet-serve export`` writes it."""
    repository = tmp_path_factory.mktemp("onnx-int8")
    assert main(["export", "--weights", str(seeded_weights), "--repository", str(repository), "--format",
                 "onnx", "--precision", "fp32,int8"]) == 0
    return Repository(repository).latest()["resnet18"]


def test_int8_through_onnx_runtime_is_exported_calibrated_and_served(
    onnx_int8: loading.ModelVersion, tmp_path: Path, photo_jpegs: dict[str, bytes]
) -> None:
    import asyncio

    version = onnx_int8
    int8 = version.metadata.artefact("onnx", "int8")  # type: ignore[union-attr]
    fp32 = version.metadata.artefact("onnx", "fp32")  # type: ignore[union-attr]
    assert int8 is not None and fp32 is not None and int8.int8_backend == "ort-qdq-u8s8-reduced+gemm-patch"
    assert int8.bytes < fp32.bytes / 2 and int8.validation is not None and int8.validation.photos >= 8
    import onnx

    stem = next(n for n in onnx.load(str(version.artefact_path(int8))).graph.node if n.op_type == "Conv")
    assert stem.input[0].endswith("_space_to_depth_dequantized")  # the 7×7 stem over RGB, rewritten by export
    engine = load_engine(version, cpu(runtime="onnxruntime", precision="int8", compiled_cache_dir=tmp_path))
    try:
        assert (engine.info.runtime, engine.info.precision) == ("onnxruntime", "int8")
        pixels = [preprocess(data, version.spec, max_pixels=10**9).pixels for data in photo_jpegs.values()]  # type: ignore[arg-type]
        probs = np.stack([p.probs for p in asyncio.run(engine.predict(pixels))])
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4) and probs.shape == (len(pixels), 1000)
    finally:
        engine.close()


def large_convolutions_zero_points(graph: Path) -> set[str]:
    """The weight zero points of the INT8 graph's convolutions with at least 1024 inputs per
    output, read from the graph itself."""
    import onnx

    model = onnx.load(str(graph))
    tensors = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = set()
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        weights = dequantized[conv.input[1]]
        if int(np.prod(tensors[weights.input[0]].dims[1:])) >= 1024:
            found.add(weights.input[2])
    return found


def test_the_int8_graph_s_large_convolutions_run_onnx_runtime_s_gemm_on_an_amx_cpu_with_the_same_answers(
    onnx_int8: loading.ModelVersion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_jpegs: dict[str, bytes],
    capfd: pytest.CaptureFixture[str]
) -> None:
    """The patch export records declares exactly the large convolutions' weight zero points as
    graph inputs; on a CPU with AMX the backend appends it (kept so across restarts, in a cache
    entry of its own), elsewhere not; the answers are the same either way. ONNX Runtime's warning
    for each zero point so declared (meant so) stays out of the server's log."""
    import base64

    import onnx

    from resnet_serve.backends import onnxruntime as ort_backend

    artefact = onnx_int8.metadata.artefact("onnx", "int8")  # type: ignore[union-attr]
    path = onnx_int8.artefact_path(artefact)
    patch = onnx.ModelProto.FromString(base64.b64decode(artefact.ort_gemm_patch or ""))
    declared = {i.name for i in patch.graph.input}
    assert declared == large_convolutions_zero_points(path) and len(declared) == 11  # ResNet-18's 3×3 from 128 up
    settings = cpu(runtime="onnxruntime", precision="int8", compiled_cache_dir=tmp_path)
    pixels = np.stack([preprocess(data, onnx_int8.spec, max_pixels=10**9).pixels  # type: ignore[arg-type]
                       for data in photo_jpegs.values()])

    def served(flags: set[str]) -> tuple[set[str], np.ndarray]:
        for module in (ort_backend, loading):
            monkeypatch.setattr(module, "amx_usable", lambda: "amx_int8" in flags)
        monkeypatch.setattr(loading, "cpu_flags", lambda: frozenset(flags))
        backend = loading.open_backend("onnxruntime", artefact, path, settings)
        return {i.name for i in backend.session.get_overridable_initializers()}, backend.run(pixels)  # type: ignore[attr-defined]

    plain, plain_probs = served({"avx512_vnni"})
    patched, patched_probs = served({"avx512_vnni", "amx_int8"})
    kept, kept_probs = served({"avx512_vnni", "amx_int8"})  # the optimised graph kept by the first patched start
    assert plain == set() and patched == kept == declared
    assert len([p for p in (tmp_path / "onnxruntime").iterdir() if p.is_dir()]) == 2  # one per CPU kind
    assert np.abs(patched_probs - plain_probs).max() < 1e-5 and np.array_equal(kept_probs, patched_probs)
    assert (patched_probs.argmax(1) == plain_probs.argmax(1)).all()
    assert "appears in graph inputs" not in capfd.readouterr().err


@pytest.mark.parametrize("patch", ["not base64!", "OgX/"])  # not base64; a graph field cut short
def test_a_gemm_patch_that_does_not_apply_is_reported_and_the_graph_served_as_exported(
    onnx_int8: loading.ModelVersion, patch: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from resnet_serve.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "amx_usable", lambda: True)
    path = onnx_int8.artefact_path(onnx_int8.metadata.artefact("onnx", "int8"))  # type: ignore[arg-type,union-attr]
    pixels = np.zeros((1, 3, 224, 224), np.uint8)
    backend = OnnxRuntimeBackend(path, threads=1, precision="int8", gemm_patch=patch)
    assert "its GEMM patch does not apply" in caplog.text and not backend.session.get_overridable_initializers()
    assert np.array_equal(backend.run(pixels), OnnxRuntimeBackend(path, threads=1, precision="int8").run(pixels))


class Crowded:
    """A backend of ``instances`` that notes the threads prepared, the threads that ran and the
    most calls running at once; each call holds its thread for 5 ms."""

    runtime, device, precision, warmup_rounds, warmup_every_size = "fake", "cpu", "fp32", 1, False

    def __init__(self, instances: int) -> None:
        self.instances = instances
        self.prepared: set[int] = set()
        self.ran: set[int] = set()
        self.lock = threading.Lock()
        self.running = self.most = 0

    def prepare_thread(self) -> None:
        self.prepared.add(threading.get_ident())

    def run(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.ran.add(threading.get_ident())
        time.sleep(0.005)
        with self.lock:
            self.running -= 1
        return pixels


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_auto_times_every_instance_calling_at_once_on_threads_prepared_as_the_server_does(instances: int) -> None:
    backend = Crowded(instances)
    ms = loading._per_image_ms(backend, crop=4, batch=2, seconds=0.1)  # type: ignore[arg-type]
    assert backend.most == instances and len(backend.ran) == instances and backend.prepared == backend.ran
    # 5 ms a call of 2 images (a sleep lasts at least that): at best 2.5 ms an image over the instances
    assert ms >= 2.5 / instances * 0.99
    assert instances == 1 or ms < 2.5 * 0.8  # instances calling together, not one after another


def test_timing_a_backend_that_fails_on_one_instance_fails_and_leaves_no_thread_waiting() -> None:
    class Failing(Crowded):
        def prepare_thread(self) -> None:
            super().prepare_thread()
            if len(self.prepared) == 2:
                raise RuntimeError("this instance cannot start")

    with pytest.raises((RuntimeError, threading.BrokenBarrierError)):
        loading._per_image_ms(Failing(2), crop=4, batch=1, seconds=0.1)  # type: ignore[arg-type]
