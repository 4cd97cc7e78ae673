"""A model repository on disk, read without torch.

    <repository>/<name>/<version>/model.json      what the model is (``ModelMetadata``)
                                  labels.tsv      class index, English name, Chinese name
                                  model.<precision>.pt | .onnx   the compiled artefacts
                                  model.fp32.state_dict.pt       the eager weights (explanations)
                                  model.fp32.cam.npz   a global-pool + linear head (torch-free CAM)

``resnet-serve export`` writes it (``backends.torch.export``); the server serves the latest
version of every model in it. A model whose metadata, labels or artefact is missing or damaged
is reported unavailable with the reason, and the others are served: nothing in one model's
folder can stop another from loading.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PositiveFloat, ValidationError, model_validator

from resnet_serve.backends import GRAPH_VERSION, ONNXRUNTIME, TORCHSCRIPT
from resnet_serve.errors import RepositoryError
from resnet_serve.labels import Labels, read_labels
from resnet_serve.spec import IMAGENET_MEAN, IMAGENET_STD, Interpolation, ModelSpec
from resnet_serve.weights import WeightsInfo, WeightsSource, sha256_of

logger = logging.getLogger(__name__)

METADATA_FILE = "model.json"
LABELS_FILE = "labels.tsv"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
ArtefactFormat = Literal["torchscript", "onnx", "state_dict", "cam"]
SUFFIXES: dict[str, str] = {"torchscript": ".pt", "onnx": ".onnx", "state_dict": ".state_dict.pt", "cam": ".cam.npz"}
# Not served by a runtime: the FP32 weights that explanations load into an eager network, and
# the linear head (W, b) with which the ONNX graphs' features give CAM explanations without torch.
EAGER_WEIGHTS, CAM_HEAD = "state_dict", "cam"
ONNX_PRECISIONS = ("fp32", "int8")  # an ONNX graph is FP32 or statically quantized INT8 (QDQ)


def valid_name(name: str) -> bool:
    """Model names are ``[a-z0-9_.-]``, start with a letter or digit, and never contain ``..``."""
    return NAME_PATTERN.fullmatch(name) is not None and ".." not in name


class Geometry(BaseModel):
    """How an image becomes the network's input (torchvision's weights transforms)."""

    resize_size: int = Field(gt=0)
    crop_size: int = Field(gt=0)
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD  # pixels are divided by it

    @model_validator(mode="after")
    def _crop_within_resize(self) -> Geometry:
        if self.crop_size > self.resize_size:
            raise ValueError(f"the crop ({self.crop_size}) exceeds the resize ({self.resize_size}): it would pad")
        return self


class SourceWeights(BaseModel):
    """The weights the artefacts were built from."""

    source: WeightsSource
    sha256: str | None = None
    path: str | None = None


class Validation(BaseModel):
    """How an artefact compared with eager PyTorch on real photos when it was exported."""

    photos: int
    max_abs_diff: float = Field(description="largest |Δp| over every class of every photo")
    top1_agreement: float
    top5_overlap: float


class Artefact(BaseModel):
    """One compiled form of the model."""

    file: str
    format: ArtefactFormat
    precision: str
    sha256: str
    bytes: int
    channels_last: bool = False
    int8_backend: str | None = None
    calibration: str | None = Field(None, description="fingerprint of the INT8 calibration photos")
    ort_gemm_patch: str | None = Field(
        None, description="INT8 ONNX: base64 of an ONNX ModelProto fragment that, appended to the graph, declares "
        "the weight zero points of its large convolutions as graph inputs; ONNX Runtime then runs those through its "
        "INT8 GEMM (which has AMX kernels) instead of its symmetric convolution (which has none)")
    built_with: dict[str, str] = Field(default_factory=dict, description="library versions")
    validation: Validation | None = None


class Batching(BaseModel):
    """Per-model batching; unset fields fall back to the server's settings."""

    max_batch_size: int | None = Field(None, ge=1, le=1024)
    max_wait_ms: float | None = Field(None, ge=0)


class ModelMetadata(BaseModel):
    """``model.json``."""

    format_version: Literal[1] = 1
    name: str
    version: int = Field(ge=1)
    architecture: str
    num_classes: int = Field(ge=1)
    geometry: Geometry
    weights: SourceWeights
    batching: Batching = Field(default_factory=Batching)
    artefacts: list[Artefact] = Field(default_factory=list)
    explain_layer: str | None = Field(None, description="the module explanations look at (unset: the last "
                                                        "convolutional block, found automatically)")
    created: str = ""
    exporter: str = ""

    def artefact(self, fmt: str, precision: str) -> Artefact | None:
        return next((a for a in self.artefacts if a.format == fmt and a.precision == precision), None)


@dataclass(frozen=True)
class ModelVersion:
    """One ``<name>/<version>`` folder: its metadata and spec, or why it cannot be served."""

    name: str
    version: int
    directory: Path
    metadata: ModelMetadata | None = None
    spec: ModelSpec | None = None
    problem: str | None = None

    @property
    def weights(self) -> WeightsInfo:
        assert self.metadata is not None
        source = self.metadata.weights
        return WeightsInfo(source.source, Path(source.path) if source.path else None, source.sha256)

    def artefact_path(self, artefact: Artefact) -> Path:
        """The artefact's file, checked against its recorded SHA-256 (a damaged one is refused)."""
        path = self.directory / artefact.file
        if not path.is_file():
            raise RepositoryError(f"{self.name}/{self.version}: artefact {artefact.file} is missing")
        digest = sha256_of(path)
        if digest != artefact.sha256:
            raise RepositoryError(f"{self.name}/{self.version}: {artefact.file} fails its SHA-256 check "
                                  f"({digest[:12]}..., recorded {artefact.sha256[:12]}...)")
        return path


def spec_of(metadata: ModelMetadata, labels: Labels) -> ModelSpec:
    g = metadata.geometry
    return ModelSpec(name=metadata.name, architecture=metadata.architecture, labels=labels,
                     resize_size=g.resize_size, crop_size=g.crop_size, mean=g.mean, std=g.std,
                     interpolation=g.interpolation)


def read_version(name: str, version: int, directory: Path) -> ModelVersion:
    """The version in ``directory``, or a ``ModelVersion`` that says what is wrong with it."""
    try:
        metadata = ModelMetadata.model_validate_json((directory / METADATA_FILE).read_text("utf-8"))
        labels = read_labels(directory / LABELS_FILE)
    except FileNotFoundError as exc:
        return ModelVersion(name, version, directory, problem=f"{Path(exc.filename).name} is missing")
    except (ValidationError, ValueError, OSError) as exc:
        return ModelVersion(name, version, directory, problem=f"unreadable metadata or labels: {exc}")
    if (metadata.name, metadata.version) != (name, version):
        problem = f"model.json says {metadata.name}/{metadata.version}, the folder is {name}/{version}"
        return ModelVersion(name, version, directory, metadata, problem=problem)
    if len(labels) != metadata.num_classes:
        problem = f"{metadata.num_classes} classes but {len(labels)} labels"
        return ModelVersion(name, version, directory, metadata, problem=problem)
    try:
        spec = spec_of(metadata, labels)
    except ValueError as exc:
        return ModelVersion(name, version, directory, metadata, problem=str(exc))
    return ModelVersion(name, version, directory, metadata, spec)


@dataclass(frozen=True)
class Wanted:
    """The artefact a server's settings ask for; the build options matter only for the default
    model, which the server exports itself and so can rebuild when they change."""

    format: ArtefactFormat
    precision: str
    channels_last: bool = False
    int8_backend: str | None = None
    calibration: str | None = None  # None: calibrated on any photos
    served_by: str | None = None  # the runtime that serves it; None: the format's own

    @property
    def runtime(self) -> str:
        return self.served_by or (ONNXRUNTIME if self.format == "onnx" else TORCHSCRIPT)

    def has(self, version: ModelVersion) -> bool:
        """Whether the version holds an artefact in this format and precision."""
        return version.metadata is not None and version.metadata.artefact(self.format, self.precision) is not None

    def pick(self, version: ModelVersion) -> Artefact:
        """The version's artefact in this format and precision, or why there is none."""
        metadata = version.metadata
        found = metadata.artefact(self.format, self.precision) if metadata else None
        if found is None:
            has = ", ".join(f"{a.format} {a.precision}" for a in metadata.artefacts) if metadata else "nothing"
            raise RepositoryError(f"{version.name}/{version.version} has no {self.format} {self.precision} artefact "
                                  f"(it has: {has or 'none'}); export it with --format {self.format} "
                                  f"--precision {self.precision}")
        return found

    def fits(self, version: ModelVersion) -> bool:
        """Whether the version holds this artefact built with these options, intact."""
        try:
            artefact = self.pick(version)
            version.artefact_path(artefact)
        except RepositoryError:
            return False
        if artefact.built_with.get("graph") != GRAPH_VERSION:
            return False
        if self.precision == "int8":
            return artefact.int8_backend == self.int8_backend and self.calibration in (None, artefact.calibration)
        return self.format != "torchscript" or artefact.channels_last == self.channels_last


class Repository:
    """The models under ``root``: every version found, and the latest of each, which is served."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def versions(self) -> list[ModelVersion]:
        """Every ``<name>/<version>`` folder, sorted by name then version."""
        if not self.root.is_dir():
            raise RepositoryError(f"the model repository {self.root} does not exist")
        found = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not valid_name(model_dir.name):
                logger.warning("skipping %s: model names are [a-z0-9_.-]", model_dir)
                continue
            for version_dir in sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                                      key=lambda p: int(p.name)):
                found.append(read_version(model_dir.name, int(version_dir.name), version_dir))
        return found

    def latest(self) -> dict[str, ModelVersion]:
        """The version served of each model: its highest, as Triton's default policy does."""
        return {v.name: v for v in self.versions()}


def write_metadata(directory: Path, metadata: ModelMetadata) -> None:
    """Replace ``model.json`` atomically, so a reader sees the old file or the new one."""
    partial = directory / f".{METADATA_FILE}.partial"
    partial.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n", "utf-8")
    os.replace(partial, directory / METADATA_FILE)
