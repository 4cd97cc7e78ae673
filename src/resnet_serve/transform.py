"""An upright RGB image → the model's input: ``uint8 [3, crop, crop]`` pixels, as numpy.

The geometry is torchvision's reference transform for the spec (resize the shorter side,
centre-crop) with its sizes and rounding, done by Pillow's antialiased resize with the spec's
filter as torchvision does it on a PIL image, so the pixels match (to one grey level in under
1% of the values, from rounding). Conversion to float and normalisation happen once per batch
inside the model graph, which keeps this stage cheap and the arrays four times smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from resnet_serve.decode import decode
from resnet_serve.spec import ModelSpec

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocessed:
    """The model's input for one upload, and what the API reports about the upload."""

    pixels: np.ndarray  # uint8 [3, crop, crop]
    format: str
    width: int
    height: int


def crop_box(width: int, height: int, resize_size: int, crop_size: int) -> tuple[float, float, float, float]:
    """The part of a ``width`` x ``height`` image that torchvision's ``Resize(resize_size)`` then
    ``CenterCrop(crop_size)`` keeps, in source pixel coordinates (its size and rounding rules)."""
    if width <= height:
        new_width, new_height = resize_size, int(resize_size * height / width)
    else:
        new_width, new_height = int(resize_size * width / height), resize_size
    top = int(round((new_height - crop_size) / 2.0))
    left = int(round((new_width - crop_size) / 2.0))
    scale_x, scale_y = width / new_width, height / new_height
    return left * scale_x, top * scale_y, (left + crop_size) * scale_x, (top + crop_size) * scale_y


def to_pixels(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """Resize + centre-crop as torchvision's reference transform; ``uint8 [3, H, W]``.

    Only the box that the crop keeps is resized (``ModelSpec`` guarantees the crop fits):
    Pillow places every output pixel by the box, so the pixels are the reference's, in about two
    thirds of the reference's time (``benchmarks/stages_bench.py``), and a long thin image never
    expands to a huge intermediate. The two passes are made explicitly, horizontal first as in a
    whole-image resize; a one-call box resize may run them the other way round, and its rounding
    then differs by one grey level in a quarter of the values of portrait images.

    The result is a channels-first view of channels-last pixels (no second copy): the graph wants
    NHWC memory anyway, and a batch is stacked once on the inference thread."""
    left, top, right, bottom = crop_box(image.width, image.height, spec.resize_size, spec.crop_size)
    size, resample = spec.crop_size, _FILTERS[spec.interpolation]
    rows = image.resize((size, image.height), resample, box=(left, 0, right, image.height))
    image = rows.resize((size, size), resample, box=(0, top, size, bottom))
    return np.array(image).transpose(2, 0, 1)


def preprocess(data: bytes, spec: ModelSpec, *, max_pixels: int) -> Preprocessed:
    """Decode, resize and crop one upload; runs in a worker thread (Pillow releases the GIL)."""
    decoded = decode(data, resize_size=spec.resize_size, max_pixels=max_pixels)
    return Preprocessed(to_pixels(decoded.image, spec), decoded.format, decoded.width, decoded.height)
