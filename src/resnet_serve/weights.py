"""The model spec and its weights: where the file is found, how it is verified, and the fallback.

``ModelSpec`` bundles what must never drift apart (as torchvision's weights enums do): the
weights file's URL with its hash, the pre-processing numbers and the categories.

Resolution order for the state_dict:
    1. ``RESNET_SERVE_WEIGHTS`` (an explicit path)
    2. ``<weights_dir>/<spec.filename>``
    3. torch hub's checkpoint cache (``torch.hub.get_dir()/checkpoints``)
    4. a download through torch hub with its hash check, into ``weights_dir``
Then, with ``weights_mode=auto``, a seeded random initialisation, reported loudly; with
``weights_mode=official`` a ``WeightsError``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torchvision.models import ResNet18_Weights, resnet18

from resnet_serve.errors import WeightsError
from resnet_serve.settings import Settings

logger = logging.getLogger(__name__)

WeightsSource = Literal["official", "custom", "random-init"]

RANDOM_INIT_SEED = 0
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[a-z]+$")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines the model: architecture, weights file, pre-processing, classes."""

    name: str
    url: str
    categories: tuple[str, ...]
    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.crop_size > self.resize_size:
            raise ValueError(f"crop_size {self.crop_size} exceeds resize_size {self.resize_size}: the crop would pad")

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        prefix = hash_in_name(self.filename)
        if prefix is None:
            raise ValueError(f"weights URL {self.url!r} carries no hash in its file name")
        return prefix

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def build_module(self) -> torch.nn.Module:
        """A fresh, randomly initialised network of this spec's architecture."""
        return resnet18(num_classes=self.num_classes)


def _spec_from_torchvision(name: str, weights: ResNet18_Weights) -> ModelSpec:
    transforms = weights.transforms()
    return ModelSpec(
        name=name,
        url=weights.url,
        categories=tuple(weights.meta["categories"]),
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        mean=tuple(transforms.mean),  # type: ignore[arg-type]
        std=tuple(transforms.std),  # type: ignore[arg-type]
    )


RESNET18 = _spec_from_torchvision("resnet18", ResNet18_Weights.IMAGENET1K_V1)


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from, for ``/model`` and the ``X-Model-Weights`` header."""

    source: WeightsSource
    path: Path | None
    sha256: str | None

    @property
    def is_random(self) -> bool:
        return self.source == "random-init"


@dataclass(frozen=True)
class LoadedWeights:
    """A state_dict and its provenance; the state_dict is dropped once the model is built."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    info: WeightsInfo


def hash_in_name(filename: str) -> str | None:
    """The hex hash torch hub puts in a checkpoint's name (``resnet18-f37072fd.pth``), if any."""
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path) -> str:
    """Check the file's SHA-256 against the hash in its name; return the full digest."""
    digest = sha256_of(path)
    expected = hash_in_name(path.name)
    if expected is not None and not digest.startswith(expected):
        raise WeightsError(
            f"{path}: SHA-256 {digest[:16]}... does not match the hash {expected!r} in its "
            "name; the file is corrupt, truncated or tampered with. Delete it and run "
            "'resnet-serve download-weights'."
        )
    return digest


def load_state_dict(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Load a verified file and check it fits the spec's architecture."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable PyTorch state_dict ({exc})") from exc
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path}: expected a state_dict, found {type(state_dict).__name__}")
    try:
        spec.build_module().load_state_dict(state_dict)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: does not fit {spec.name}: {exc}") from exc
    return state_dict


def hub_checkpoint_path(spec: ModelSpec) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.filename


def download(spec: ModelSpec, weights_dir: Path, *, progress: bool = True) -> Path:
    """Download the official file with torch hub's hash check; return its path."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = weights_dir / spec.filename
    try:
        torch.hub.download_url_to_file(
            spec.url, str(target), hash_prefix=spec.sha256_prefix, progress=progress
        )
    except Exception as exc:
        raise WeightsError(f"could not download {spec.url}: {exc}") from exc
    return target


def random_init(spec: ModelSpec) -> LoadedWeights:
    """A seeded random initialisation: reproducible, and never mistaken for the real thing."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(RANDOM_INIT_SEED)
        state_dict = spec.build_module().state_dict()
    finally:
        torch.random.set_rng_state(generator_state)
    return LoadedWeights(state_dict, WeightsInfo(source="random-init", path=None, sha256=None))


def _candidates(spec: ModelSpec, settings: Settings) -> list[Path]:
    return [settings.weights_dir / spec.filename, hub_checkpoint_path(spec)]


def _from_file(path: Path, spec: ModelSpec, *, explicit: bool) -> LoadedWeights:
    digest = verify_file(path)
    official = digest.startswith(spec.sha256_prefix)
    if explicit and not official and hash_in_name(path.name) is None:
        logger.warning("%s has no hash in its name; its integrity cannot be verified", path)
    source: WeightsSource = "official" if official else "custom"
    return LoadedWeights(load_state_dict(path, spec), WeightsInfo(source, path, digest))


def resolve(spec: ModelSpec, settings: Settings) -> LoadedWeights:
    """Find, verify and load the weights following the documented order."""
    if settings.weights_mode == "random":
        return random_init(spec)
    if settings.weights is not None:
        if not settings.weights.is_file():
            raise WeightsError(f"RESNET_SERVE_WEIGHTS={settings.weights} does not exist")
        loaded = _from_file(settings.weights, spec, explicit=True)
        if settings.weights_mode == "official" and loaded.info.source != "official":
            raise WeightsError(
                f"{settings.weights} is not the official {spec.filename} "
                "(RESNET_SERVE_WEIGHTS_MODE=official)"
            )
        return loaded
    for path in _candidates(spec, settings):
        if path.is_file():
            return _from_file(path, spec, explicit=False)
    problem = f"no {spec.filename} in {settings.weights_dir} or {hub_checkpoint_path(spec).parent}"
    if settings.allow_download:
        try:
            return _from_file(download(spec, settings.weights_dir), spec, explicit=False)
        except WeightsError as exc:
            problem = f"{problem}, and {exc}"
    if settings.weights_mode == "official":
        raise WeightsError(f"{problem} (RESNET_SERVE_WEIGHTS_MODE=official)")
    logger.warning(
        "USING RANDOM-INIT WEIGHTS: %s. Predictions are meaningless. Run "
        "'resnet-serve download-weights' or set RESNET_SERVE_WEIGHTS.",
        problem,
    )
    return random_init(spec)
