"""Real photos for INT8 calibration and export validation, as the model's input pixels.

Images come from a folder the user gives (``--calibration``, ``RESNET_SERVE_CALIBRATION_DIR``);
without one, the photos that ship inside scikit-image (installed with the ``torch`` extra) are
used, so the defaults work offline. No torch here: the slim server reads the fingerprint too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from resnet_serve.errors import ServeError
from resnet_serve.spec import ModelSpec
from resnet_serve.transform import preprocess

logger = logging.getLogger(__name__)

# Named as images: HEIC too, with or without its extra (without, the file gets its 415 naming it).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif"}
MAX_PHOTOS = 256
SKIMAGE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "horse.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
                  "color.png", "logo.png", "grass.png", "gravel.png", "brick.png")


class CalibrationError(RuntimeError):
    """No usable calibration photos."""


def default_calibration_files() -> list[Path]:
    """scikit-image's bundled colour photos."""
    try:
        import skimage
    except ImportError as exc:
        raise CalibrationError(
            "calibration and validation need photos: give a folder (--calibration, or "
            "RESNET_SERVE_CALIBRATION_DIR), or install the 'torch' extra, whose scikit-image ships sample photos"
        ) from exc
    data = Path(skimage.__file__).parent / "data"
    return [data / n for n in SKIMAGE_PHOTOS if (data / n).is_file()]


def calibration_files(directory: Path | None) -> list[Path]:
    if directory is None:
        return default_calibration_files()
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"no images in calibration directory {directory}")
    return files[:MAX_PHOTOS]


def calibration_fingerprint(files: Sequence[Path]) -> str:
    """Identifies a set of photos, so an artefact calibrated on other photos is rebuilt."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def load_pixels(files: Sequence[Path], spec: ModelSpec) -> np.ndarray:
    """The photos as one ``uint8 [N, 3, crop, crop]`` batch; unreadable files are skipped."""
    images = []
    for path in files:
        try:
            images.append(preprocess(path.read_bytes(), spec, max_pixels=200_000_000).pixels)
        except (OSError, ServeError) as exc:
            logger.warning("skipping photo %s: %s", path, exc)
    if not images:
        raise CalibrationError("none of the calibration photos could be decoded")
    return np.stack(images)
