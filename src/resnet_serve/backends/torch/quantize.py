"""Static post-training INT8 quantization of the network for x86 CPUs.

FX graph mode (``prepare_fx`` → calibrate → ``convert_fx``) with PyTorch's default qconfig for
the chosen backend (``fbgemm``, ``onednn`` or ``x86``). Calibration runs real photos through the
same pre-processing the service uses. Images come from a folder the user gives
(``resnet-serve quantize --calibration-dir``); without one, the photos that ship inside
scikit-image (the ``int8`` extra) are used, so the default works offline.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet_serve.errors import ServeError
from resnet_serve.spec import ModelSpec
from resnet_serve.transform import preprocess

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MAX_CALIBRATION_IMAGES = 256


class CalibrationError(RuntimeError):
    """No usable calibration images."""


def default_calibration_files() -> list[Path]:
    """scikit-image's bundled colour photos (installed with the ``int8`` extra)."""
    try:
        import skimage
    except ImportError as exc:
        raise CalibrationError(
            "INT8 needs calibration photos: give RESNET_SERVE_CALIBRATION_DIR (or --calibration-dir), "
            "or install the 'int8' extra, whose scikit-image ships sample photos"
        ) from exc
    data = Path(skimage.__file__).parent / "data"
    names = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "horse.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
             "color.png", "logo.png", "grass.png", "gravel.png", "brick.png")
    return [data / n for n in names if (data / n).is_file()]


def calibration_files(directory: Path | None) -> list[Path]:
    if directory is None:
        return default_calibration_files()
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"no images in calibration directory {directory}")
    return files[:MAX_CALIBRATION_IMAGES]


def calibration_fingerprint(files: Sequence[Path]) -> str:
    """Identifies a calibration set, for the compiled-model cache key."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def load_calibration_batch(files: Sequence[Path], spec: ModelSpec) -> torch.Tensor:
    """The calibration images as one ``uint8`` batch; unreadable files are skipped."""
    images = []
    for path in files:
        try:
            images.append(preprocess(path.read_bytes(), spec, max_pixels=200_000_000).pixels)
        except (OSError, ServeError) as exc:
            logger.warning("skipping calibration image %s: %s", path, exc)
    if not images:
        raise CalibrationError("none of the calibration images could be decoded")
    return torch.from_numpy(np.stack(images))


def quantize_network(net: nn.Module, spec: ModelSpec, calibration: torch.Tensor, backend: str) -> nn.Module:
    """An INT8 copy of ``net`` (float in, float out), calibrated on ``calibration`` (uint8 NCHW)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    example = (torch.zeros(1, 3, spec.crop_size, spec.crop_size),)
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the API works as documented.
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"torch\.ao")
        prepared = prepare_fx(copy.deepcopy(net).eval(), get_default_qconfig_mapping(backend), example)
        with torch.no_grad():
            for batch in calibration.split(16):
                prepared((batch.float() / 255.0 - mean) / std)
        return convert_fx(prepared).eval()
