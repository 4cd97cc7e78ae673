"""Encoded bytes in memory → an upright 8-bit RGB Pillow image, within hard limits.

The format is identified from the bytes (never the name or Content-Type) and the pixel count is
checked from the header before anything is decoded. Large JPEGs are decoded at a reduced scale
(Pillow's draft mode) that keeps ``DRAFT_MARGIN`` times the size the model's resize needs.

Every failure is a ``ServeError`` subclass: the caller never sees a Pillow exception.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import (  # noqa: F401 (AVIF, TIFF and WebP register themselves when imported)
    AvifImagePlugin,
    Image,
    ImageOps,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from resnet_serve.errors import (
    InvalidImage,
    PayloadTooLarge,
    ServeError,
    UnsupportedMediaType,
)

try:  # the `heif` extra: iPhone photos (HEIC), through libheif
    import pillow_heif
except ImportError:
    pillow_heif = None

logger = logging.getLogger(__name__)

# Pillow's preinit() registers JPEG (and MPO through it), PNG, BMP and GIF; WebP, TIFF and AVIF
# come from importing their plugins. Image.init() would import all of Pillow's ~40 (~30 ms of start-up).
Image.preinit()
if pillow_heif is not None:
    pillow_heif.register_heif_opener()

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF") + (("HEIF",) if pillow_heif else ())
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF, AVIF" + (", HEIC" if pillow_heif else "")
# Pillow decodes a JPEG at 1/2, 1/4 or 1/8 scale almost for free. We keep this many times the
# resize target so the antialiased resize that follows hides the difference.
DRAFT_MARGIN = 4

# Signatures of the formats we decode: bytes that start like this but fail are corrupt (400),
# anything else is not an image we know (415).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError)


@dataclass(frozen=True)
class Decoded:
    """The upright RGB image, and what the API reports about the upload: its format and its
    upright size before any draft scaling."""

    image: Image.Image
    format: str
    width: int
    height: int


def looks_like_an_image(data: bytes) -> bool:
    """Whether the bytes start like one of the formats we decode."""
    return (data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
            or (data[4:8] == b"ftyp" and data[8:12] in _AVIF_BRANDS + (_HEIF_BRANDS if pillow_heif else ())))


def is_heif_without_its_extra(data: bytes) -> bool:
    return pillow_heif is None and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def check_png_crcs(data: bytes) -> None:
    """Verify every PNG chunk's CRC, as libpng does; Pillow skips the IDAT ones."""
    offset = len(_PNG_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        end = offset + 8 + length
        if end + 4 > len(data):
            return  # truncated: the decoder reports it
        kind = data[offset + 4 : offset + 8]
        (stored,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(data[offset + 4 : end]) != stored:
            raise InvalidImage(f"the PNG is corrupt: chunk {kind.decode('latin-1')!r} has a bad CRC")
        if kind == b"IEND":
            return
        offset = end + 4


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Identify the format from the bytes and check the pixel count before decoding."""
    if not data:
        raise InvalidImage("the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        if looks_like_an_image(data):
            raise InvalidImage("the image is corrupt: its header cannot be read") from None
        if is_heif_without_its_extra(data):
            raise UnsupportedMediaType("HEIC/HEIF photos need the heif extra on the server: "
                                       "pip install 'resnet-serve[heif]'") from None
        raise UnsupportedMediaType(f"the upload is not an image in a supported format ({FORMAT_NAMES})") from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"the image has more than {max_pixels} pixels") from None
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the image header is corrupt ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if width < 1 or height < 1:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    return image


def _draft(image: Image.Image, resize_size: int) -> None:
    """Ask a JPEG decoder for a reduced scale that still leaves ``DRAFT_MARGIN``x headroom."""
    if image.format not in ("JPEG", "MPO"):
        return
    width, height = image.size
    keep = resize_size * DRAFT_MARGIN
    shorter = min(width, height)
    if shorter < 2 * keep:
        return
    image.draft("RGB", (-(-width * keep // shorter), -(-height * keep // shorter)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, as a viewer shows it."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        grey = np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, *, resize_size: int, max_pixels: int) -> Decoded:
    """Decode to an upright RGB image (EXIF orientation applied; first frame of animations).

    ``resize_size`` is the shorter side the model's resize will produce: a JPEG is decoded at
    the smallest scale that still keeps ``DRAFT_MARGIN`` times that."""
    try:
        image = open_image(data, max_pixels=max_pixels)
        return _decode_opened(data, image, resize_size, max_pixels)
    except ServeError:
        raise
    except Exception as exc:  # a decoder bug must still be the client's 400, not our 500
        logger.exception("unexpected error while decoding an upload")
        raise InvalidImage(f"the image could not be decoded ({type(exc).__name__})") from None


def _decode_opened(data: bytes, image: Image.Image, resize_size: int, max_pixels: int) -> Decoded:
    width, height = image.size
    fmt = str(image.format)
    try:
        if image.format == "PNG":
            check_png_crcs(data)
        _draft(image, resize_size)
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        image = ImageOps.exif_transpose(image) or image
        return Decoded(_to_rgb(image), fmt, width, height)
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"the image has more than {max_pixels} pixels") from None
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the image data is truncated or corrupt ({exc})") from None
