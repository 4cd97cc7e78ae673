"""From settings to warmed engines.

- The repository to serve: the configured one (``RESNET_SERVE_MODEL_REPOSITORY``), or the
  default one under the compiled-model cache, into which the server exports the built-in
  ResNet-18 itself on first start (and again when its weights or build settings change). Either
  way the models are then served from a repository: one code path.
- The artefact each model needs (``Wanted``: the runtime's format, the precision), checked
  against its recorded SHA-256, opened by the runtime's backend, wrapped in an ``Engine`` and
  warmed up.

This is the one place that knows which runtime module to import, and it imports each only when
it is needed: serving ONNX Runtime never loads torch, and exporting is the only step that needs
torchvision.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from resnet_serve.backends import Backend
from resnet_serve.errors import RepositoryError
from resnet_serve.inference import Engine, ModelInfo
from resnet_serve.photos import calibration_files, calibration_fingerprint
from resnet_serve.repository import Artefact, ModelVersion, Repository, Wanted, read_version
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec, builtin_spec
from resnet_serve.weights import locate

logger = logging.getLogger(__name__)

TORCH_EXTRA = "pip install 'resnet-serve[torch]'"


@dataclass(frozen=True)
class RepositoryPlan:
    """The repository to serve, and the export still to run into it first (None: nothing)."""

    root: Path
    export: Callable[[], bool] | None = None


def wanted_artefact(settings: Settings) -> Wanted:
    """The artefact the configured runtime, device and precision need."""
    if settings.runtime == "onnxruntime":
        if settings.precision not in ("auto", "fp32") or settings.device not in ("auto", "cpu"):
            raise RepositoryError("RESNET_SERVE_RUNTIME=onnxruntime runs FP32 on the CPU only")
        return Wanted("onnx", "fp32")
    from resnet_serve.backends.torch.runtime import select_device, select_precision

    device = select_device(settings.device)
    precision = select_precision(settings.precision, device)
    if precision == "int8":
        fingerprint = calibration_fingerprint(calibration_files(settings.calibration_dir))
        return Wanted("torchscript", precision, int8_backend=settings.int8_backend, calibration=fingerprint)
    return Wanted("torchscript", precision, channels_last=settings.channels_last and device.type in ("cpu", "cuda"))


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


def _default_is_current(root: Path, spec: ModelSpec, settings: Settings, wanted: Wanted) -> bool:
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
    return same and wanted.fits(version)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One exporter at a time per repository (uvicorn workers start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def plan_repository(settings: Settings) -> RepositoryPlan:
    """The repository to serve. For the default one, the weights are resolved now (so
    ``RESNET_SERVE_WEIGHTS_MODE=official`` without them stops the start at once) and the export,
    if one is needed, is left for the background."""
    if settings.model_repository is not None:
        if not settings.model_repository.is_dir():
            raise RepositoryError(f"RESNET_SERVE_MODEL_REPOSITORY={settings.model_repository} is not a folder")
        return RepositoryPlan(settings.model_repository)
    root, spec, wanted = default_root(settings), default_spec(settings), wanted_artefact(settings)
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
        with _locked(root):
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


def open_backend(artefact: Artefact, path: Path, settings: Settings) -> Backend:
    if artefact.format == "onnx":
        try:
            from resnet_serve.backends.onnxruntime import OnnxRuntimeBackend
        except ImportError as exc:
            raise RepositoryError(f"ONNX artefacts need onnxruntime ({exc})") from None
        return OnnxRuntimeBackend(path, threads=settings.ort_threads, precision=artefact.precision)
    try:
        from resnet_serve.backends.torch.runtime import TorchScriptBackend
    except ImportError:
        raise RepositoryError(f"TorchScript artefacts need torch ({TORCH_EXTRA}); "
                              "or serve the ONNX artefact with RESNET_SERVE_RUNTIME=onnxruntime") from None
    return TorchScriptBackend.load(path, device_name=settings.device, precision=artefact.precision,
                                   threads=settings.torch_threads, int8_backend=artefact.int8_backend)


def load_engine(version: ModelVersion, settings: Settings, *, exported: bool = False,
                started: float | None = None) -> Engine:
    """The version's artefact for these settings, verified, opened and warmed up; its start time
    counts from ``started`` (when an export came first) or from now."""
    if version.spec is None or version.metadata is None:
        raise RepositoryError(f"{version.name}/{version.version}: {version.problem}")
    start = started if started is not None else time.perf_counter()
    artefact = wanted_artefact(settings).pick(version)
    backend = open_backend(artefact, version.artefact_path(artefact), settings)
    served = model_settings(version, settings)
    info = ModelInfo(
        spec=version.spec, version=version.version, device=backend.device, precision=backend.precision,
        weights=version.weights, threads=settings.ort_threads if artefact.format == "onnx" else settings.torch_threads,
        runtime=backend.runtime, channels_last=artefact.channels_last,
        compiled_from="exported" if exported else "repository", max_batch_size=served.max_batch_size,
    )
    engine = Engine(backend, info)
    engine.warmup(served.max_batch_size, version.spec.crop_size)
    info.start_s = round(time.perf_counter() - start, 3)
    logger.info("loaded %s/%d (%s %s on %s) in %.1fs", version.name, version.version, backend.runtime,
                backend.precision, backend.device, info.start_s)
    return engine
