"""What defines a model, beside its weights: architecture, classes and preprocessing numbers.

As in torchvision's weights enums, these travel together in one frozen ``ModelSpec``, so the
pre-processing, the labels and the network cannot drift apart: ``num_classes`` is the number of
labels, and the geometry is the one the network was trained with. No torch here: the serving
path reads a spec to decode and crop images whatever runtime runs the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from resnet_serve.labels import Labels, imagenet_labels

Interpolation = Literal["bilinear", "bicubic", "nearest"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[a-z]+$")


def hash_in_name(filename: str) -> str | None:
    """The hex hash torch hub puts in a checkpoint's name (``resnet18-f37072fd.pth``), if any."""
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ModelSpec:
    """A classifier: its torchvision architecture, labels, input geometry and official weights."""

    name: str
    architecture: str
    labels: Labels = field(repr=False)
    resize_size: int
    crop_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Interpolation = "bilinear"
    url: str | None = None

    def __post_init__(self) -> None:
        if self.crop_size > self.resize_size:
            raise ValueError(f"crop_size {self.crop_size} exceeds resize_size {self.resize_size}: the crop would pad")

    @property
    def categories(self) -> tuple[str, ...]:
        return self.labels.en

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def filename(self) -> str:
        if self.url is None:
            raise ValueError(f"{self.name} has no official weights file")
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        prefix = hash_in_name(self.filename)
        if prefix is None:
            raise ValueError(f"weights URL {self.url!r} carries no hash in its file name")
        return prefix


# torchvision's ResNet18_Weights.IMAGENET1K_V1 (its transforms() and url), written out so that
# reading it needs no torch.
RESNET18 = ModelSpec(
    name="resnet18",
    architecture="resnet18",
    labels=imagenet_labels(),
    resize_size=256,
    crop_size=224,
    url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
)
BUILTIN: dict[str, ModelSpec] = {RESNET18.name: RESNET18}


def builtin_spec(name: str) -> ModelSpec:
    """The built-in model called ``name`` (``RESNET_SERVE_DEFAULT_MODEL``)."""
    try:
        return BUILTIN[name]
    except KeyError:
        raise ValueError(f"no built-in model {name!r}; built in: {', '.join(BUILTIN)}") from None
