"""Export: a torchvision classifier and its weights → a model folder in a repository.

Each artefact is compiled from the weights (TorchScript traced and frozen, ONNX exported; INT8
calibrated on real photos), written, then loaded back and compared with eager PyTorch on real
photos: an FP32 artefact whose probabilities differ by more than ``FP32_TOLERANCE`` is refused;
the figures of every artefact go into ``model.json``. A version folder is built beside its final
place and renamed into it, so a server never sees half of one.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision

from resnet_serve import __version__
from resnet_serve.backends import GRAPH_VERSION
from resnet_serve.backends.torch.checkpoints import (
    LoadedWeights,
    fit,
    head_size,
    random_init,
    read_checkpoint,
    resolve,
)
from resnet_serve.backends.torch.compile import CompileOptions, compile_model
from resnet_serve.backends.torch.gradcam import find_layer, linear_head
from resnet_serve.backends.torch.graph import ServingNetwork, build_network
from resnet_serve.backends.torch.runtime import torchscript_quietly
from resnet_serve.errors import ExportError, RepositoryError
from resnet_serve.labels import Labels, imagenet_labels, write_labels
from resnet_serve.photos import calibration_files, calibration_fingerprint, load_pixels
from resnet_serve.repository import (
    CAM_HEAD,
    EAGER_WEIGHTS,
    LABELS_FILE,
    ONNX_PRECISIONS,
    SUFFIXES,
    Artefact,
    Batching,
    Geometry,
    ModelMetadata,
    ModelVersion,
    SourceWeights,
    Wanted,
    read_version,
    valid_name,
    write_metadata,
)
from resnet_serve.results import top_k
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec, hash_in_name
from resnet_serve.weights import WeightsInfo, sha256_of, verify_file

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
VALIDATION_PHOTOS = 16
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportJob:
    """What to export, once the spec (labels, geometry) and the weights are settled."""

    spec: ModelSpec
    weights: LoadedWeights
    repository: Path
    version: int
    formats: Sequence[str] = ("torchscript",)
    precisions: Sequence[str] = ("fp32",)
    channels_last: bool = True
    int8_backend: str = "x86"
    calibration: Path | None = None
    batching: Batching = field(default_factory=Batching)
    explain_layer: str | None = None
    cam: CamHead | None = None  # found by export() when the head is global-pool + linear


@dataclass(frozen=True)
class CamHead:
    """The layer whose activations the ONNX graphs output, and the linear head over their mean."""

    layer: str
    weight: np.ndarray  # [classes, K]
    bias: np.ndarray  # [classes]


def classification_architectures() -> list[str]:
    """Every image-classification model ``torchvision.models`` can build."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def default_weights(architecture: str) -> torchvision.models.WeightsEnum | None:
    try:
        return torchvision.models.get_model_weights(architecture).DEFAULT  # type: ignore[no-any-return]
    except (ValueError, AttributeError):
        return None


def default_geometry(architecture: str) -> Geometry:
    """The architecture's training geometry, from torchvision's weights transforms."""
    weights = default_weights(architecture)
    if weights is None:
        return Geometry(resize_size=256, crop_size=224)
    t = weights.transforms()
    return Geometry(resize_size=int(t.resize_size[0]), crop_size=int(t.crop_size[0]),
                    interpolation=t.interpolation.value, mean=tuple(t.mean), std=tuple(t.std))


def _eager(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> ServingNetwork:
    net = build_network(spec)
    net.load_state_dict(state_dict)
    return ServingNetwork(net.eval(), spec, torch.float32, channels_last=False).eval()


def _compare(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    top5 = [len(set(top_k(c, 5)[1]) & set(top_k(r, 5)[1])) / min(5, r.shape[0]) for c, r in zip(candidate, reference)]
    return {"photos": len(reference), "max_abs_diff": float(np.abs(candidate - reference).max()),
            "top1_agreement": float((candidate.argmax(1) == reference.argmax(1)).mean()),
            "top5_overlap": float(np.mean(top5))}


def _run_artefact(fmt: str, path: Path, pixels: np.ndarray, spec: ModelSpec,
                  weights: dict[str, torch.Tensor], gemm_patch: str | None = None) -> np.ndarray:
    """The written artefact, loaded back as the server will load it on this CPU, on the
    validation photos."""
    if fmt == "onnx":
        from resnet_serve.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, threads=torch.get_num_threads(), gemm_patch=gemm_patch).run(pixels)
    if fmt == CAM_HEAD:
        with np.load(path) as head:
            return _cam_probs(spec, _eager(spec, weights).net, str(head["layer"]), pixels, head["weight"], head["bias"])
    if fmt == EAGER_WEIGHTS:
        with torch.inference_mode():
            return _eager(spec, torch.load(path, map_location="cpu", weights_only=True))(torch.from_numpy(pixels)).numpy()
    with torchscript_quietly(), torch.inference_mode():
        return torch.jit.load(str(path), map_location="cpu")(torch.from_numpy(pixels)).float().numpy()


def _write(job: ExportJob, fmt: str, precision: str, path: Path) -> dict[str, object]:
    """Compile one artefact into ``path``; what it was built with."""
    if fmt == CAM_HEAD:
        assert job.cam is not None
        np.savez(path, layer=np.array(job.cam.layer), weight=job.cam.weight, bias=job.cam.bias)
        return {}
    if fmt == EAGER_WEIGHTS:
        torch.save({k: v.detach().float().contiguous() if v.is_floating_point() else v
                    for k, v in job.weights.state_dict.items()}, path)
        return {}
    if fmt == "onnx":
        from resnet_serve.backends.torch.onnx_export import export_onnx, quantize_onnx

        features = job.cam.layer if job.cam is not None else None
        if precision == "fp32":
            export_onnx(job.spec, job.weights, path, features)
            return {}
        fp32 = export_onnx(job.spec, job.weights, path.with_name(f".{path.name}.fp32"), features)
        try:
            files = calibration_files(job.calibration)
            built = quantize_onnx(fp32, path, load_pixels(files, job.spec))
        finally:
            fp32.unlink(missing_ok=True)
        return {**built, "calibration": calibration_fingerprint(files)}
    options = CompileOptions(precision, job.channels_last, job.int8_backend, job.calibration)  # type: ignore[arg-type]
    model = compile_model(job.spec, job.weights, options)
    with torchscript_quietly():
        torch.jit.save(model, str(path))
    if precision != "int8":
        return {"channels_last": job.channels_last}
    return {"int8_backend": job.int8_backend,
            "calibration": calibration_fingerprint(calibration_files(job.calibration))}


def build_artefact(job: ExportJob, fmt: str, precision: str, directory: Path, pixels: np.ndarray,
                   reference: np.ndarray, progress: Progress) -> Artefact:
    """Compile, write, load back and validate one artefact."""
    if fmt not in SUFFIXES:
        raise ExportError(f"unknown format {fmt!r}; use torchscript, onnx or {EAGER_WEIGHTS}")
    name = f"model.{precision}{SUFFIXES[fmt]}"
    started = time.perf_counter()
    progress(f"{job.spec.name}: building {fmt} {precision}")
    options = _write(job, fmt, precision, directory / name)
    served = _run_artefact(fmt, directory / name, pixels, job.spec, job.weights.state_dict,
                           options.get("ort_gemm_patch"))  # type: ignore[arg-type]
    if not np.isfinite(served).all():
        raise ExportError(f"{job.spec.name} {fmt} {precision} gives NaN or infinite probabilities on the "
                          "validation photos; refusing to write it")
    figures = _compare(served, reference)
    if precision == "fp32" and figures["max_abs_diff"] > FP32_TOLERANCE:
        raise ExportError(f"{job.spec.name} {fmt} fp32 differs from eager PyTorch by {figures['max_abs_diff']:.2e} "
                          f"(more than {FP32_TOLERANCE:g}) on {len(pixels)} photos; refusing to write it")
    progress(f"{job.spec.name}: {fmt} {precision} in {time.perf_counter() - started:.1f}s; "
             f"max |Δp| {figures['max_abs_diff']:.1e}, top-1 agreement {figures['top1_agreement']:.0%}")
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "graph": GRAPH_VERSION}
    return Artefact(file=name, format=fmt, precision=precision, sha256=sha256_of(directory / name),  # type: ignore[arg-type]
                    bytes=(directory / name).stat().st_size, built_with=versions, validation=figures,  # type: ignore[arg-type]
                    **options)  # type: ignore[arg-type]


def _metadata(job: ExportJob, artefacts: list[Artefact]) -> ModelMetadata:
    spec, info = job.spec, job.weights.info
    geometry = Geometry(resize_size=spec.resize_size, crop_size=spec.crop_size, interpolation=spec.interpolation,
                        mean=spec.mean, std=spec.std)
    return ModelMetadata(
        name=spec.name, version=job.version, architecture=spec.architecture, num_classes=spec.num_classes,
        geometry=geometry, batching=job.batching, artefacts=artefacts, explain_layer=job.explain_layer,
        weights=SourceWeights(source=info.source, sha256=info.sha256, path=str(info.path) if info.path else None),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        exporter=f"resnet-serve {__version__}",
    )


def export(job: ExportJob, progress: Progress = logger.info) -> ModelVersion:
    """Write (or add artefacts to) ``<repository>/<name>/<version>``; the version as written.

    An existing version takes new artefacts only if it was built from the same weights and
    labels; its other artefacts stay."""
    if not valid_name(job.spec.name):
        raise ExportError(f"model name {job.spec.name!r}: use lowercase letters, digits and _.- only")
    if "onnx" in job.formats and not set(job.precisions) & set(ONNX_PRECISIONS):
        raise ExportError(f"ONNX artefacts are {' or '.join(ONNX_PRECISIONS)}, not {','.join(job.precisions)}")
    final = job.repository / job.spec.name / str(job.version)
    existing = read_version(job.spec.name, job.version, final) if final.exists() else None
    if existing is not None and not same_model(existing, job):
        raise ExportError(f"{final} already holds another model (other weights, labels or geometry); "
                          "choose another --version or remove it")
    if job.explain_layer is None and existing is not None and existing.metadata is not None:
        job = dataclasses.replace(job, explain_layer=existing.metadata.explain_layer)
    try:
        find_layer(build_network(job.spec), job.explain_layer)
    except RepositoryError as exc:
        raise ExportError(f"--explain-layer: {exc}") from None
    staging = final.parent / f".{job.version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(final, staging) if existing is not None else staging.mkdir(parents=True)
    try:
        pixels = load_pixels(calibration_files(job.calibration)[:VALIDATION_PHOTOS], job.spec)
        with torch.inference_mode():
            reference = _eager(job.spec, job.weights.state_dict)(torch.from_numpy(pixels)).numpy()
        if not np.isfinite(reference).all():
            raise ExportError(f"{job.spec.name}: the network gives NaN or infinite probabilities on the validation "
                              "photos, in eager PyTorch already (weights with NaN, as a diverged training leaves)")
        if "onnx" in job.formats:
            job = dataclasses.replace(job, cam=find_cam_head(job, pixels, reference, progress))
        built = [build_artefact(job, f, p, staging, pixels, reference, progress) for f, p in _artefacts_of(job)]
        kept = [a for a in (existing.metadata.artefacts if existing and existing.metadata else [])
                if (a.format, a.precision) not in {(b.format, b.precision) for b in built}]
        write_labels(job.spec.labels, staging / LABELS_FILE)
        write_metadata(staging, _metadata(job, kept + built))
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_version(job.spec.name, job.version, final)


def _artefacts_of(job: ExportJob) -> list[tuple[str, str]]:
    """(format, precision) of each artefact to build: every precision of each compiled format, and
    the eager weights once, in FP32 (explanations' input, whatever precision serves)."""
    pairs = [(f, p) for f in job.formats if f != EAGER_WEIGHTS for p in job.precisions
             if f != "onnx" or p in ONNX_PRECISIONS]  # an FP16 or BF16 model: TorchScript's artefact only
    return (pairs + ([(EAGER_WEIGHTS, "fp32")] if EAGER_WEIGHTS in job.formats else [])
            + ([(CAM_HEAD, "fp32")] if job.cam is not None else []))


def _cam_probs(spec: ModelSpec, net: torch.nn.Module, layer: str, pixels: np.ndarray, weight: np.ndarray,
               bias: np.ndarray) -> np.ndarray:
    """The probabilities that ``softmax(W · mean(A) + b)`` gives, with ``A`` the layer's
    activations in the eager network: equal to the network's own if the head is that."""
    seen: list[torch.Tensor] = []
    hook = find_layer(net, layer)[1].register_forward_hook(lambda _m, _i, output: seen.append(output))
    try:
        with torch.inference_mode():
            ServingNetwork(net, spec, torch.float32, channels_last=False).eval()(torch.from_numpy(pixels))
    finally:
        hook.remove()
    logits = seen[-1].mean(dim=(2, 3)).numpy() @ weight.T + bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def find_cam_head(job: ExportJob, pixels: np.ndarray, reference: np.ndarray, progress: Progress) -> CamHead | None:
    """The model's global-pool + linear head, if it has one: read from the Jacobian on two photos
    (``gradcam.linear_head``), then checked on every validation photo."""
    net = _eager(job.spec, job.weights.state_dict).net
    layer = find_layer(net, job.explain_layer)[0]
    head = linear_head(net, job.spec, pixels[:2], layer)
    if head is not None:
        figures = _compare(_cam_probs(job.spec, net, layer, pixels, *head), reference)
        if figures["max_abs_diff"] <= FP32_TOLERANCE:
            return CamHead(layer, *head)
    progress(f"{job.spec.name}: the head is not a global pool + linear layer; no torch-free CAM")
    return None


def same_model(version: ModelVersion, job: ExportJob) -> bool:
    """Whether ``version`` was built from the job's weights, labels and geometry."""
    return (version.metadata is not None and version.spec is not None
            and version.metadata.weights.sha256 == job.weights.info.sha256
            and version.metadata.weights.source == job.weights.info.source
            and dataclasses.replace(version.spec, url=None) == dataclasses.replace(job.spec, url=None))


def _discard(folder: Path) -> None:
    """Remove a version folder: renamed aside first, so no reader sees half of one."""
    aside = folder.parent / f".{folder.name}.old"
    shutil.rmtree(aside, ignore_errors=True)
    if folder.exists():
        folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _swap_in(staging: Path, final: Path) -> None:
    _discard(final)
    staging.rename(final)


def _checked_architecture(architecture: str) -> str:
    known = classification_architectures()
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see 'resnet-serve models'"
        raise ExportError(f"{architecture!r} is not a torchvision classification model{hint}")
    return architecture


def model_inputs(architecture: str, weights: str, labels: Labels | None, name: str, geometry: Geometry,
                 settings: Settings) -> tuple[ModelSpec, LoadedWeights]:
    """The spec and the weights for ``--weights official|random|PATH``.

    Labels default to ImageNet's (English and Chinese) for a 1000-class head and are required
    for any other; a checkpoint whose head does not match the labels is refused."""
    _checked_architecture(architecture)
    official = default_weights(architecture)

    def spec_with(classes: Labels, url: str | None = None) -> ModelSpec:
        g = geometry
        return ModelSpec(name=name, architecture=architecture, labels=classes, resize_size=g.resize_size,
                         crop_size=g.crop_size, mean=g.mean, std=g.std, interpolation=g.interpolation, url=url)

    if weights == "random":
        logger.warning("EXPORTING RANDOM-INIT WEIGHTS for %s: its predictions will be meaningless", name)
        return (spec := spec_with(labels or imagenet_labels())), random_init(spec)
    if weights == "official":
        if official is None:
            raise ExportError(f"torchvision has no pretrained weights for {architecture}")
        classes = labels or imagenet_labels()
        if len(classes) != len(official.meta["categories"]):
            raise ExportError(f"the official {architecture} weights have {len(official.meta['categories'])} "
                              f"classes, but there are {len(classes)} labels")
        spec = spec_with(classes, official.url)
        return spec, resolve(spec, settings.model_copy(update={"weights_mode": "official", "weights": None}))
    path = Path(weights)
    if not path.is_file():
        raise ExportError(f"--weights {weights}: no such file (or use 'official' or 'random')")
    state_dict = read_checkpoint(path, architecture)
    head = head_size(state_dict, architecture)
    if labels is None and head not in (None, 1000):
        raise ExportError(f"--labels is required: the checkpoint's head has {head} classes, not ImageNet's 1000")
    spec = spec_with(labels or imagenet_labels())
    fit(state_dict, spec, str(path))
    digest = verify_file(path)
    source = "official" if official is not None and digest.startswith(hash_in_name(official.url) or "-") else "custom"
    return spec, LoadedWeights(state_dict, WeightsInfo(source, path, digest))  # type: ignore[arg-type]


def next_version(repository: Path, name: str) -> int:
    folder = repository / name
    versions = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(versions, default=0) + 1


def ensure_default_model(root: Path, spec: ModelSpec, weights: LoadedWeights, settings: Settings,
                         wanted: list[Wanted], progress: Progress = logger.info) -> bool:
    """Make ``<root>/<spec.name>/1`` hold the wanted artefacts, built from ``weights``; a version
    built from other weights is replaced, one that fits is extended. The runtimes may want
    different precisions of their formats (BF16: TorchScript's BF16 artefact, and the FP32 graph
    OpenVINO runs in BF16), so one export per precision. Whether it exported."""
    folder = root / spec.name / "1"
    current = read_version(spec.name, 1, folder) if folder.exists() else None
    missing = [w for w in wanted if current is None or not w.fits(current)]
    build = missing or wanted
    formats: dict[str, list[str]] = {}  # precision: its formats; the eager weights go with the first
    for w in build:
        formats.setdefault(build[0].precision if w.format == EAGER_WEIGHTS else w.precision, []).append(w.format)
    jobs = [ExportJob(spec, weights, root, 1, formats=list(dict.fromkeys(f)), precisions=[precision],
                      channels_last=any(w.channels_last for w in wanted), int8_backend=settings.int8_backend,
                      calibration=settings.calibration_dir) for precision, f in formats.items()]
    if current is not None and same_model(current, jobs[0]):
        if not missing:
            return False
        logger.warning("%s: no intact %s built with these settings; exporting it again", spec.name,
                       ", ".join(f"{w.format} {w.precision}" for w in missing))
    elif current is not None:
        logger.warning("%s: the weights, labels or geometry changed; exporting it again", spec.name)
        _discard(folder)
    for job in jobs:
        export(job, progress)
    return True
