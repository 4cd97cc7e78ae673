"""Images for the load generators: a folder of files, or scikit-image's photos as JPEGs.

No third-party import at module level, so the locustfile runs in a plain locust container.
"""

from __future__ import annotations

import io
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")


def folder_images(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"no images in {folder}")
    return [p.read_bytes() for p in files]


def default_images() -> list[bytes]:
    """Real photos from scikit-image (a dev dependency), re-encoded as JPEGs."""
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    images = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.open(data / name).convert("RGB").save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images
