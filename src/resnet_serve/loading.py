"""From settings to warmed engines.

- The repository to serve: the configured one (``RESNET_SERVE_MODEL_REPOSITORY``), or the
  default one under the compiled-model cache, into which the server exports the built-in
  ResNet-18 itself on first start (and again when its weights or build settings change). Either
  way the models are then served from a repository: one code path.
- The artefact each model needs (``Wanted``: the runtime's format, the precision), checked
  against its recorded SHA-256, opened by the runtime's backend, wrapped in an ``Engine`` and
  warmed up.
- With ``RESNET_SERVE_RUNTIME=auto`` and several runtimes installed, which one serves: timed
  once per machine in a child process (``timing_child``: the request as JSON on its stdin, the
  timings on its stdout) that the loading thread waits for, so that the server maps only the
  runtime it chose; a child that fails or outlives ``TIMING_TIMEOUT_S`` leaves the first runtime
  in tie order, untimed; the failure is kept for ``FAILED_TIMING_KEPT_S``, for the other
  workers of the same start, and the next start times again.
- Workers of one server (``--workers N``) start together and take turns through lock files in
  the compiled-model cache (``_locked``): one exports the default model, one times the runtimes,
  one compiles each artefact; the others wait, then find what it kept. So every worker serves
  the same runtime, and no timing runs beside another that would slow it down.

This is the one place that knows which runtime module to import, and it imports each only when
it is needed: serving ONNX Runtime never loads torch, and exporting is the only step that needs
torchvision.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_serve.backends import (
    ONNXRUNTIME,
    OPENVINO,
    ORT_INT8_SCHEME,
    TORCHSCRIPT,
    Backend,
    amx_usable,
    cpu_flags,
    cpu_model,
)
from resnet_serve.errors import ExplanationsUnavailable, RepositoryError
from resnet_serve.inference import Engine, ModelInfo
from resnet_serve.photos import CalibrationError, calibration_files, calibration_fingerprint
from resnet_serve.repository import CAM_HEAD, EAGER_WEIGHTS, Artefact, ModelVersion, Repository, Wanted, read_version
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec, builtin_spec
from resnet_serve.weights import locate

logger = logging.getLogger(__name__)

TORCH_EXTRA = "pip install 'resnet-serve[torch]'"
OPENVINO_EXTRA = "pip install 'resnet-serve[openvino]'"
# Each runtime and the package it needs, in the order a tie is settled (TorchScript first).
RUNTIME_PACKAGES = {TORCHSCRIPT: "torch", ONNXRUNTIME: "onnxruntime", OPENVINO: "openvino"}
# The precisions the ONNX runtimes run, on the CPU only (ONNX Runtime has no BF16 convolutions
# there; OpenVINO runs the FP32 graph in BF16). TorchScript runs them all, FP16 on a GPU.
RUNTIME_PRECISIONS = {ONNXRUNTIME: ("auto", "fp32", "int8"), OPENVINO: ("auto", "fp32", "int8", "bf16")}


@dataclass(frozen=True)
class RepositoryPlan:
    """The repository to serve, and the export still to run into it first (None: nothing)."""

    root: Path
    export: Callable[[], bool] | None = None


def torch_installed() -> bool:
    """The full install: what needs torch (export, Grad-CAM, calibration) can run here."""
    return importlib.util.find_spec("torch") is not None


def accelerator_present() -> bool:
    """An NVIDIA driver or Apple silicon, seen without importing torch."""
    return Path("/proc/driver/nvidia/version").exists() or (sys.platform == "darwin" and platform.machine() == "arm64")


def candidate_runtimes(settings: Settings) -> list[str]:
    """The runtimes that may serve: the configured one, or for ``auto`` every installed one that
    can run these settings (ONNX Runtime: the CPU, FP32 or INT8; OpenVINO: BF16 as well)."""
    if settings.runtime != "auto":
        return [settings.runtime]
    installed = [runtime for runtime, package in RUNTIME_PACKAGES.items()
                 if importlib.util.find_spec(package) is not None]
    cpu = settings.device == "cpu" or (settings.device == "auto" and not accelerator_present())
    installed = [r for r in installed if r == TORCHSCRIPT or (cpu and settings.precision in RUNTIME_PRECISIONS[r])]
    if not installed:
        extra = f", or OpenVINO ({OPENVINO_EXTRA})" if settings.precision == "bf16" and cpu else ""
        raise RepositoryError(f"no installed runtime runs {settings.precision} on {settings.device}: "
                              f"the TorchScript runtime needs torch ({TORCH_EXTRA}){extra}")
    return installed


def _calibration(settings: Settings) -> str | None:
    """The fingerprint of the photos an INT8 export here calibrates on. None where there are none
    to read: the slim install, given no folder, has neither the default photos nor the means to
    export, so it serves the INT8 artefact the full install built, whichever photos that used."""
    try:
        return calibration_fingerprint(calibration_files(settings.calibration_dir))
    except CalibrationError:
        if settings.calibration_dir is not None or torch_installed():
            raise
        return None


def torchscript_target(settings: Settings) -> tuple[str, str]:
    """Device and precision for TorchScript; torch is imported only to look for a GPU."""
    if settings.device == "cpu" or (settings.device == "auto" and not accelerator_present()):
        precision = "fp32" if settings.precision == "auto" else settings.precision
        if precision == "fp16":
            raise RepositoryError("RESNET_SERVE_PRECISION=fp16 needs a CUDA or MPS device")
        return "cpu", precision
    from resnet_serve.backends.torch.runtime import select_device, select_precision

    device = select_device(settings.device)
    return device.type, select_precision(settings.precision, device)


def wanted_for(runtime: str, settings: Settings, *, built_here: bool = False) -> Wanted:
    """The artefact ``runtime`` needs to serve these settings. ``built_here``: for the built-in
    model, which the server builds itself, down to the INT8 calibration photos (see
    ``_calibration``)."""
    if runtime in RUNTIME_PRECISIONS:
        if settings.precision not in RUNTIME_PRECISIONS[runtime] or settings.device not in ("auto", "cpu"):
            *others, last = (p.upper() for p in RUNTIME_PRECISIONS[runtime] if p != "auto")
            runs = f"{', '.join(others)} or {last}"
            raise RepositoryError(f"RESNET_SERVE_RUNTIME={runtime} runs {runs} on the CPU only")
        if settings.precision == "int8":
            calibration = _calibration(settings) if built_here else None
            return Wanted("onnx", "int8", int8_backend=ORT_INT8_SCHEME, calibration=calibration, served_by=runtime)
        return Wanted("onnx", "fp32", served_by=runtime)  # BF16 (OpenVINO): the FP32 graph, run in BF16
    device, precision = torchscript_target(settings)
    if precision == "int8":
        calibration = _calibration(settings) if built_here else None
        return Wanted("torchscript", "int8", int8_backend=settings.int8_backend, calibration=calibration)
    return Wanted("torchscript", precision, channels_last=settings.channels_last and device in ("cpu", "cuda"))


def wanted_artefacts(settings: Settings, *, built_here: bool = False) -> list[Wanted]:
    """One artefact per candidate runtime (ONNX Runtime and OpenVINO want the same one)."""
    return [wanted_for(runtime, settings, built_here=built_here) for runtime in candidate_runtimes(settings)]


def default_spec(settings: Settings) -> ModelSpec:
    return builtin_spec(settings.default_model or "resnet18")


@functools.cache
def _scratch_repository() -> Path:
    """With the compiled-model cache off, a repository that lives as long as the process."""
    root = Path(tempfile.mkdtemp(prefix="resnet-serve-repository-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def default_root(settings: Settings) -> Path:
    return settings.compiled_cache_dir / "repository" if settings.compiled_cache else _scratch_repository()


def _default_is_current(root: Path, spec: ModelSpec, settings: Settings, wanted: list[Wanted]) -> bool:
    """Whether the default model can be served as it is, decided without torch."""
    folder = root / spec.name / "1"
    if not folder.is_dir():
        return False
    version = read_version(spec.name, 1, folder)
    if version.spec is None or version.metadata is None:
        return False
    if dataclasses.replace(version.spec, url=None) != dataclasses.replace(spec, url=None):
        return False
    found = locate(spec, weights=settings.weights, weights_dir=settings.weights_dir,
                   random=settings.weights_mode == "random")
    built = version.metadata.weights
    if found is not None:
        same = (found.source, found.sha256) == (built.source, built.sha256)
    else:  # nothing on disk: official artefacts stand; random ones only if no download is tried
        same = built.source == "official" or (built.source == "random-init" and not settings.allow_download
                                              and settings.weights_mode == "auto")
    return same and all(w.fits(version) for w in wanted)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path``. Uvicorn workers start together: one at a time
    exports the default model, times the runtimes, or compiles an artefact into the cache, and
    the others, once they hold the lock, find its result. Where no lock file can be made (a
    read-only cache), each goes on without one and does the work itself."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.open("w")
    except OSError as exc:
        logger.debug("going on without the lock %s: %s", path, exc)
        lock = None
    if lock is None:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def explanation_artefacts() -> list[Wanted]:
    """With torch installed, the server's own export adds the eager weights explanations use."""
    return [Wanted(EAGER_WEIGHTS, "fp32")] if torch_installed() else []


def plan_repository(settings: Settings) -> RepositoryPlan:
    """The repository to serve. For the default one, the weights are resolved now (so
    ``RESNET_SERVE_WEIGHTS_MODE=official`` without them stops the start at once) and the export,
    if one is needed, is left for the background."""
    if settings.model_repository is not None:
        if not settings.model_repository.is_dir():
            raise RepositoryError(f"RESNET_SERVE_MODEL_REPOSITORY={settings.model_repository} is not a folder")
        return RepositoryPlan(settings.model_repository)
    root, spec = default_root(settings), default_spec(settings)
    wanted = wanted_artefacts(settings, built_here=True) + explanation_artefacts()
    if _default_is_current(root, spec, settings, wanted):
        return RepositoryPlan(root)
    try:
        from resnet_serve.backends.torch.checkpoints import resolve
        from resnet_serve.backends.torch.export import ensure_default_model
    except ImportError as exc:
        raise RepositoryError(
            f"the built-in {spec.name} must be exported once, which needs torch ({TORCH_EXTRA}); or point "
            f"RESNET_SERVE_MODEL_REPOSITORY at a repository made with 'resnet-serve export' ({exc})"
        ) from None
    weights = resolve(spec, settings)

    def export() -> bool:
        with _locked(root / ".lock"):
            return ensure_default_model(root, spec, weights, settings, wanted)

    return RepositoryPlan(root, export)


def served_versions(root: Path, default_model: str | None) -> tuple[list[ModelVersion], dict[str, ModelVersion], str]:
    """Every version in the repository, the latest of each model (served), and the default model:
    ``default_model`` if set, else resnet18 if served, else the first by name."""
    versions = Repository(root).versions()
    latest = {v.name: v for v in versions}
    if not latest:
        raise RepositoryError(f"the model repository {root} holds no model (see 'resnet-serve export')")
    if default_model is not None and default_model not in latest:
        raise RepositoryError(f"RESNET_SERVE_DEFAULT_MODEL={default_model} is not in {root} "
                              f"(it has {', '.join(latest)})")
    return versions, latest, default_model or ("resnet18" if "resnet18" in latest else next(iter(latest)))


def open_model(settings: Settings, name: str | None = None) -> Engine:
    """One model, loaded and warmed in this thread: what the CLI and the benchmarks use (the
    service does the same steps with the loading in the background)."""
    started = time.perf_counter()
    plan = plan_repository(settings)
    exported = plan.export() if plan.export is not None else False
    _, latest, default = served_versions(plan.root, settings.default_model)
    if (name or default) not in latest:
        raise RepositoryError(f"no model {name!r} in {plan.root} (it has {', '.join(latest)})")
    return load_engine(latest[name or default], settings, exported=exported, started=started)


def model_settings(version: ModelVersion, settings: Settings) -> Settings:
    """The settings with the model's own batching (from its metadata) where it sets any."""
    batching = version.metadata.batching if version.metadata else None
    update = {k: v for k, v in batching.model_dump().items() if v is not None} if batching else {}
    return settings.model_copy(update=update) if update else settings


def _compiled_cache(artefact: Artefact, settings: Settings, runtime: str, runtime_version: str) -> Path | None:
    """Where ``runtime`` keeps what it compiled from this artefact for this CPU and runtime
    version (None: nowhere)."""
    if not settings.compiled_cache:
        return None
    machine = hashlib.sha256(f"{_machine()}|{runtime_version}".encode()).hexdigest()[:12]
    return settings.compiled_cache_dir / runtime / f"{_built(artefact)}-{machine}"


def _machine() -> str:
    """This CPU as what is compiled or timed for it is keyed: its model name (which a virtual
    machine may report as a generic one) and a digest of its instruction sets."""
    return f"{cpu_model()} [{hashlib.sha256(' '.join(sorted(cpu_flags())).encode()).hexdigest()[:8]}]"


def _built(artefact: Artefact) -> str:
    """The artefact as what is compiled or timed from it is keyed: its file, and the graph patch
    its manifest carries (which changes what ONNX Runtime compiles, not the file)."""
    patch = artefact.ort_gemm_patch
    return artefact.sha256[:16] + (f"+{hashlib.sha256(patch.encode()).hexdigest()[:8]}" if patch else "")


def runtime_threads(runtime: str, settings: Settings) -> int:
    return {ONNXRUNTIME: settings.ort_threads, OPENVINO: settings.openvino_threads}.get(runtime, settings.torch_threads)


def _locked_beside(path: Path | None) -> contextlib.AbstractContextManager[None]:
    """``_locked`` on a lock file beside ``path`` (what workers make once and then share: the
    runtime choices, an artefact's compiled-model cache); no lock where nothing is kept."""
    return _locked(path.with_name(f"{path.name}.lock")) if path is not None else contextlib.nullcontext()


STALE_CACHE_ENTRY_S = 30 * 86400.0  # what a runtime compiled and no server opened for 30 days


def _in_use(entry: Path | None) -> None:
    """Mark ``entry`` (what a runtime compiled from one artefact for this CPU) as used now, by its
    mtime, and remove that runtime's other entries no server has opened for
    ``STALE_CACHE_ENTRY_S`` (older artefacts, runtime versions, CPUs), with their lock files; so
    the cache does not grow with every export and upgrade. A server still mapping a removed file
    keeps its pages; the next to need the entry compiles it again."""
    if entry is None:
        return
    now = time.time()
    with contextlib.suppress(OSError):
        os.utime(entry, (now, now))
        for other in entry.parent.iterdir():
            if other == entry or other.name.startswith(".") or other.suffix == ".lock":
                continue  # scratch folders are the runtime's own to clear (backends.onnxruntime)
            if now - other.stat().st_mtime > STALE_CACHE_ENTRY_S:
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
                other.with_name(f"{other.name}.lock").unlink(missing_ok=True)


def open_backend(runtime: str, artefact: Artefact, path: Path, settings: Settings) -> Backend:
    """``runtime``'s backend for the artefact."""
    threads = runtime_threads(runtime, settings)
    if runtime == OPENVINO:
        try:
            from resnet_serve.backends.openvino import RUNTIME_VERSION as OPENVINO_VERSION
            from resnet_serve.backends.openvino import OpenVinoBackend
        except ImportError as exc:
            raise RepositoryError(f"RESNET_SERVE_RUNTIME=openvino needs OpenVINO ({OPENVINO_EXTRA}; {exc})") from None
        cache = _compiled_cache(artefact, settings, OPENVINO, OPENVINO_VERSION)
        with _locked_beside(cache):
            precision = "bf16" if settings.precision == "bf16" and artefact.precision == "fp32" else artefact.precision
            backend: Backend = OpenVinoBackend(path, threads=threads, precision=precision, cache=cache,
                                               instances=settings.instances)
        _in_use(cache)
        return backend
    if runtime == ONNXRUNTIME:
        try:
            from resnet_serve.backends.onnxruntime import RUNTIME_VERSION, OnnxRuntimeBackend
        except ImportError as exc:
            raise RepositoryError(f"ONNX artefacts need onnxruntime ({exc})") from None
        patched = "+amx" if artefact.ort_gemm_patch and amx_usable() else ""  # the same CPU may refuse AMX
        optimised = _compiled_cache(artefact, settings, ONNXRUNTIME, RUNTIME_VERSION + patched)
        with _locked_beside(optimised):
            backend = OnnxRuntimeBackend(path, threads=threads, precision=artefact.precision,
                                         arena=settings.ort_arena, spinning=settings.ort_spinning, optimised=optimised,
                                         gemm_patch=artefact.ort_gemm_patch, instances=settings.instances)
        _in_use(optimised)
        return backend
    try:
        from resnet_serve.backends.torch.runtime import TorchScriptBackend
    except ImportError:
        raise RepositoryError(f"TorchScript artefacts need torch ({TORCH_EXTRA}); "
                              "or serve the ONNX artefact with RESNET_SERVE_RUNTIME=onnxruntime") from None
    return TorchScriptBackend.load(path, device_name=settings.device, precision=artefact.precision,
                                   threads=threads, int8_backend=artefact.int8_backend, instances=settings.instances)


def open_wanted(version: ModelVersion, wanted: Wanted, settings: Settings) -> Backend:
    """The wanted artefact of the version, opened by its runtime (not checked: see ``open_verified``)."""
    artefact = wanted.pick(version)
    return open_backend(wanted.runtime, artefact, version.directory / artefact.file, settings)


def open_verified(version: ModelVersion, wanted: Wanted, settings: Settings) -> Backend:
    """Open the artefact while a second thread checks its SHA-256 (hashlib releases the GIL),
    so the check, tens of milliseconds for a ResNet-18 (``benchmarks/start_bench.py``), overlaps
    the opening rather than delaying it; ONNX Runtime mostly opens its kept optimised graph and
    never reads the artefact. A damaged or missing file is still refused, with the check's
    message even when the runtime failed to open it first."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="resnet-serve-verify") as pool:
        checked = pool.submit(version.artefact_path, wanted.pick(version))
        try:
            backend = open_wanted(version, wanted, settings)
        except Exception:
            checked.result()
            raise
        checked.result()
    return backend


def open_explainer(version: ModelVersion | None, spec: ModelSpec) -> object:
    """What explains this model: Grad-CAM over its eager FP32 weights where torch is installed
    (``backends.torch.gradcam.GradCam``, any architecture), else CAM from its ONNX graph where its
    head allows one (``backends.onnxruntime.OnnxCam``, no torch); or 501 saying what is missing."""
    metadata = version.metadata if version is not None else None
    if version is None or metadata is None:
        raise ExplanationsUnavailable(f"{spec.name} was not loaded from a model folder; it cannot be explained")
    eager, head = metadata.artefact(EAGER_WEIGHTS, "fp32"), metadata.artefact(CAM_HEAD, "fp32")
    graph = metadata.artefact("onnx", "fp32") or metadata.artefact("onnx", "int8")
    try:
        if eager is not None and torch_installed():
            from resnet_serve.backends.torch.gradcam import GradCam

            return GradCam.load(version.artefact_path(eager), spec, metadata.explain_layer)
        if head is not None and graph is not None and importlib.util.find_spec("onnxruntime") is not None:
            from resnet_serve.backends.onnxruntime import OnnxCam

            return OnnxCam(version.artefact_path(graph), version.artefact_path(head))
    except (RepositoryError, ValueError) as exc:
        raise ExplanationsUnavailable(f"{spec.name}: {exc}") from None
    if eager is None and head is None:
        raise ExplanationsUnavailable(
            f"{spec.name} has no eager weights in its model folder; export it again with "
            f"--format torchscript,{EAGER_WEIGHTS} (or onnx,{EAGER_WEIGHTS})")
    raise ExplanationsUnavailable(f"explanations of {spec.name} run on PyTorch, which this install lacks "
                                  f"({TORCH_EXTRA}); its head allows no torch-free CAM")


def _per_image_ms(backend: Backend, crop: int, batch: int, seconds: float = 0.4) -> float:
    """The backend's time per image at one batch size as the server runs it: each instance on a
    thread of its own, prepared as the inference threads are, all calling at once (so several
    instances are timed by what they finish together), after two warm-up calls each."""
    pixels = np.zeros((batch, 3, crop, crop), dtype=np.uint8)
    clock: list[float] = []
    ready = threading.Barrier(backend.instances, action=lambda: clock.append(time.perf_counter()))

    def calls() -> tuple[int, float]:
        try:
            backend.prepare_thread()
            for _ in range(2):
                backend.run(pixels)
        except BaseException:
            ready.abort()  # the other instances stop waiting
            raise
        ready.wait()
        runs = 0
        while time.perf_counter() - clock[0] < seconds or runs < 3:
            backend.run(pixels)
            runs += 1
        return runs, time.perf_counter()

    with concurrent.futures.ThreadPoolExecutor(backend.instances) as pool:
        done = [f.result() for f in [pool.submit(calls) for _ in range(backend.instances)]]
    runs, end = sum(r for r, _ in done), max(t for _, t in done)
    return (end - clock[0]) * 1000.0 / (runs * batch)


def _choices_file(settings: Settings) -> Path | None:
    return settings.compiled_cache_dir / "runtime-choices.json" if settings.compiled_cache else None


def _read_choices(settings: Settings) -> dict[str, dict[str, object]]:
    path = _choices_file(settings)
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text()) if path is not None else _CHOICES  # type: ignore[no-any-return]
    return {}


def _keep_choice(settings: Settings, key: str, choice: dict[str, object]) -> None:
    path = _choices_file(settings)
    if path is None:
        _CHOICES[key] = choice
        return
    choices = _read_choices(settings)
    choices[key] = choice
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(choices, indent=2) + "\n")
        partial.replace(path)


_CHOICES: dict[str, dict[str, object]] = {}  # with the compiled-model cache off: this process only
TIE = 0.05


@dataclass
class Choice:
    """The runtime that serves a model and why; ``verified``: the choosing already checked its
    artefact's SHA-256 (not to be hashed twice)."""

    wanted: Wanted
    reason: str
    verified: bool = False


def _intact(version: ModelVersion, candidates: list[Wanted]) -> tuple[list[Wanted], list[str]]:
    """The candidates whose artefact is there and passes its SHA-256 check, and what is wrong
    with the others (a configured runtime's damaged artefact fails the model when it loads).
    Each artefact is checked once: ONNX Runtime and OpenVINO serve the same one."""
    problem_of: dict[str, str | None] = {}  # artefact file: what is wrong with it, or None
    for wanted in candidates:
        if wanted.has(version) and (file := wanted.pick(version).file) not in problem_of:
            try:
                version.artefact_path(wanted.pick(version))
                problem_of[file] = None
            except RepositoryError as exc:
                problem_of[file] = str(exc)
    intact = [w for w in candidates if w.has(version) and problem_of[w.pick(version).file] is None]
    return intact, [problem for problem in problem_of.values() if problem is not None]


def choose_runtime(version: ModelVersion, settings: Settings) -> Choice:
    """The configured runtime; or, for ``auto`` with several runtimes and their artefacts at hand,
    the fastest on this machine (per image, the mean of batch 1 and the max batch, every instance
    calling at once; on a tie within
    5%, the first of TorchScript, ONNX Runtime, OpenVINO), timed in a child process at the first
    start and kept, keyed by CPU model and flags, runtimes, threads and artefacts. A damaged
    artefact is left out of the choice, loudly."""
    candidates = wanted_artefacts(settings)
    if len(candidates) < 2:
        return Choice(candidates[0], "configured" if settings.runtime != "auto" else "the only runtime installed")
    present, problems = _intact(version, candidates)
    for problem in problems:
        logger.warning("%s; serving another runtime's artefact", problem)
    if len(present) < 2:
        reason = "; ".join(["the only runtime with an intact artefact here", *problems])
        return Choice((present or candidates)[0], reason, verified=bool(present))
    assert version.spec is not None
    batch = model_settings(version, settings).max_batch_size
    key = "|".join([_machine(), *(f"{w.runtime} {runtime_threads(w.runtime, settings)} threads" for w in present),
                    f"batch {batch}", *dict.fromkeys(_built(w.pick(version)) for w in present)]
                   + ([f"{settings.instances} instances"] if settings.instances > 1 else []))  # 1: keys kept before
    kept, timed_now = _kept_or_timed(version, present, settings, batch, key)
    if kept is None:
        failed = "timing the runtimes failed" + ("" if timed_now else " (in another worker, moments ago)")
        return Choice(present[0], "; ".join([f"{failed}, so the first in tie order", *problems]), verified=True)
    if timed_now:
        logger.info("%s/%d: %s is faster on this machine (ms per image, batch 1 and %d: %s)", version.name,
                    version.version, kept["runtime"], batch, kept["ms"])
    return Choice(next(w for w in present if w.runtime == kept["runtime"]),
                  "; ".join([f"timed {'now' if timed_now else 'earlier'}: {kept['ms']}", *problems]), verified=True)


def _kept_or_timed(version: ModelVersion, present: list[Wanted], settings: Settings, batch: int,
                   key: str) -> tuple[dict[str, object] | None, bool]:
    """The choice kept under ``key``, or one timed now and kept (None: the timing failed); and
    whether it was timed now. Workers starting together take turns: the first times, the others
    wait and read its choice, so a server's workers never serve different runtimes, and no
    timing runs beside another that would slow it down. A failed timing is kept for
    ``FAILED_TIMING_KEPT_S``: the workers waiting on it fall back as it did instead of timing
    again one after another (and perhaps succeeding, and choosing apart); a later start times again."""
    kept = _kept(settings, key)
    if kept is not None:
        return (None if "failed" in kept else kept), False
    with _locked_beside(_choices_file(settings)):
        kept = _kept(settings, key)
        if kept is not None:
            return (None if "failed" in kept else kept), False
        ms = _timings(version, present, settings, batch)
        if ms is None:
            _keep_choice(settings, key, {"failed": time.time()})
            return None, True
        fastest = min(ms.values())
        best = next(runtime for runtime in RUNTIME_PACKAGES if runtime in ms and ms[runtime] <= fastest * (1 + TIE))
        kept = {"runtime": best, "ms": ms}
        _keep_choice(settings, key, kept)
        return kept, True


FAILED_TIMING_KEPT_S = 60.0  # long enough for the workers of one start, short of the next start


def _kept(settings: Settings, key: str) -> dict[str, object] | None:
    """The choice kept under ``key``: a runtime, or a recent failure (an old one is forgotten)."""
    kept = _read_choices(settings).get(key)
    if kept is not None and "failed" in kept and time.time() - float(kept["failed"]) > FAILED_TIMING_KEPT_S:  # type: ignore[arg-type]
        return None
    return kept


TIMING_TIMEOUT_S = 600.0  # opening every runtime cold (ONNX Runtime optimising an FP32 graph) takes seconds


def _timings(version: ModelVersion, present: list[Wanted], settings: Settings, batch: int) -> dict[str, float] | None:
    """Each runtime's ms per image (the mean of batch 1 and ``batch``), timed in a child process:
    a runtime once opened keeps its libraries mapped for the life of the process (torch's are
    hundreds of MB), and only the chosen one should stay in the server; a runtime that crashes
    while timed takes the child down, not the server. What the child compiles stays in the
    compiled-model cache, so the server then opens the chosen artefact warm. None: the child failed."""
    request = {"name": version.name, "version": version.version, "directory": str(version.directory),
               "runtimes": [w.runtime for w in present], "batch": batch,
               "settings": settings.model_dump(mode="json", exclude={"api_key"})}
    try:
        child = subprocess.run([sys.executable, "-c", "from resnet_serve.loading import timing_child; timing_child()"],
                               input=json.dumps(request), capture_output=True, text=True, timeout=TIMING_TIMEOUT_S)
        if child.returncode == 0:
            return {runtime: float(ms) for runtime, ms in json.loads(child.stdout.splitlines()[-1]).items()}
        logger.warning("timing the runtimes failed (exit code %d): %s", child.returncode, child.stderr[-2000:])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        logger.warning("timing the runtimes failed: %s", exc)
    return None


def timing_child() -> None:
    """The child's side of ``_timings``: the request as JSON on stdin, the timings on stdout."""
    request = json.loads(sys.stdin.read())
    settings = Settings.model_validate(request["settings"])
    version = read_version(request["name"], request["version"], Path(request["directory"]))
    assert version.spec is not None, version.problem
    wanted = {w.runtime: w for w in wanted_artefacts(settings)}
    ms: dict[str, float] = {}
    for runtime in request["runtimes"]:
        backend = open_wanted(version, wanted[runtime], settings)  # checked by the server's _intact
        ms[runtime] = round((_per_image_ms(backend, version.spec.crop_size, 1)
                             + _per_image_ms(backend, version.spec.crop_size, request["batch"])) / 2, 2)
    print(json.dumps(ms))


def load_engine(version: ModelVersion, settings: Settings, *, exported: bool = False,
                started: float | None = None) -> Engine:
    """The version's artefact for these settings (and runtime, chosen), verified, opened and
    warmed up; its start time counts from ``started`` (when an export came first) or from now."""
    if version.spec is None or version.metadata is None:
        raise RepositoryError(f"{version.name}/{version.version}: {version.problem}")
    start = started if started is not None else time.perf_counter()
    choice = choose_runtime(version, settings)
    artefact = choice.wanted.pick(version)
    if choice.verified:
        backend = open_wanted(version, choice.wanted, settings)
    else:
        backend = open_verified(version, choice.wanted, settings)
    served = model_settings(version, settings)
    info = ModelInfo(
        spec=version.spec, version=version.version, device=backend.device, precision=backend.precision,
        weights=version.weights, threads=runtime_threads(backend.runtime, settings),
        runtime=backend.runtime, runtime_reason=choice.reason, channels_last=artefact.channels_last,
        compiled_from="exported" if exported else "repository", max_batch_size=served.max_batch_size,
        instances=backend.instances, directory=version.directory,
    )
    engine = Engine(backend, info)
    engine.warmup(served.max_batch_size, version.spec.crop_size)
    info.start_s = round(time.perf_counter() - start, 3)
    logger.info("loaded %s/%d (%s %s on %s; %s) in %.1fs", version.name, version.version, backend.runtime,
                backend.precision, backend.device, choice.reason, info.start_s)
    return engine
