"""An explanation grid (``[h, w]`` in ``[0, 1]``, over the model's centre crop) → pictures of the
uploaded image's own size, with Pillow and numpy only (no torch, no matplotlib).

The grid covers the crop the model saw; ``transform.crop_box`` says where that crop lies in the
upright image, so the grid is scaled into that box and the rest of the picture is left empty
(transparent in the heatmap, the plain photo in the overlay).
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from resnet_serve.spec import ModelSpec
from resnet_serve.transform import crop_box

Box = tuple[float, float, float, float]


def image_box(width: int, height: int, spec: ModelSpec) -> Box:
    """Where the model's crop lies in a ``width`` x ``height`` upright image."""
    return crop_box(width, height, spec.resize_size, spec.crop_size)


def place(grid: np.ndarray, width: int, height: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """The grid scaled (bilinear) into ``box`` of a ``height`` x ``width`` canvas: the map and the
    mask of the pixels it covers, both ``[height, width]``."""
    left, top, right, bottom = (round(box[0]), round(box[1]), round(box[2]), round(box[3]))
    left, top = max(0, min(left, width - 1)), max(0, min(top, height - 1))
    right, bottom = max(left + 1, min(right, width)), max(top + 1, min(bottom, height))
    scaled = Image.fromarray(np.asarray(grid, dtype=np.float32), mode="F").resize(
        (right - left, bottom - top), Image.Resampling.BILINEAR)
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top:bottom, left:right] = np.clip(np.asarray(scaled), 0.0, 1.0)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return canvas, mask


def colours(values: np.ndarray) -> np.ndarray:
    """The "jet" colour map (blue → cyan → yellow → red), ``[..., 3]`` uint8 for values in [0, 1]."""
    x = values[..., None] * 4.0
    rgb = np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def heatmap_image(values: np.ndarray, mask: np.ndarray) -> Image.Image:
    """RGBA: the colour map inside the crop, transparent outside it."""
    rgba = np.concatenate([colours(values), (mask * 255).astype(np.uint8)[..., None]], axis=-1)
    return Image.fromarray(rgba, mode="RGBA")


def overlay_image(photo: Image.Image, values: np.ndarray, mask: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """The photo with the coloured map laid over the crop at ``opacity``."""
    alpha = (mask * values.clip(0.15, 1.0) * opacity)[..., None]  # cold regions stay mostly photo
    mixed = np.asarray(photo, dtype=np.float32) * (1.0 - alpha) + colours(values) * alpha
    return Image.fromarray((mixed + 0.5).astype(np.uint8), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=3)  # fast: these are made per request
    return buffer.getvalue()


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")
