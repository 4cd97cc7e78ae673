"""Pre-processing: parity with torchvision's reference transform, formats, modes, EXIF, errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from resnet_serve.decode import decode
from resnet_serve.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from resnet_serve.inference import Engine
from resnet_serve.spec import RESNET18
from resnet_serve.transform import preprocess, to_pixels
from tests.conftest import as_jpeg, encode

REFERENCE = ResNet18_Weights.IMAGENET1K_V1.transforms()
MEAN = torch.tensor(RESNET18.mean).view(3, 1, 1)
STD = torch.tensor(RESNET18.std).view(3, 1, 1)
LIMIT = 10**9


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - MEAN) / STD


def reference_input(data: bytes) -> torch.Tensor:
    return REFERENCE(Image.open(io.BytesIO(data)).convert("RGB"))


def ours(data: bytes) -> torch.Tensor:
    return torch.from_numpy(preprocess(data, RESNET18, max_pixels=LIMIT).pixels)


def to_tensor(image: Image.Image, spec: object) -> torch.Tensor:
    return torch.from_numpy(to_pixels(image, spec))  # type: ignore[arg-type]


def test_matches_torchvisions_reference_transform_on_real_photos(photo_jpegs: dict[str, bytes]) -> None:
    for name, data in photo_jpegs.items():
        pixels = ours(data)
        assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8, name
        assert (normalised(pixels) - reference_input(data)).abs().max() <= 0.02, name


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (640, 427), (256, 256), (224, 224), (225, 999), (3, 700)])
def test_the_crop_box_resize_matches_resize_then_crop_within_one_grey_level(size: tuple[int, int]) -> None:
    noise = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise)  # noise: any shift of the sampling grid would show at once
    reference = F.center_crop(F.resize(image, [256], interpolation=InterpolationMode.BILINEAR), [224])
    expected = torch.from_numpy(np.array(reference)).permute(2, 0, 1).int()
    got = to_tensor(image, RESNET18).int()
    assert got.shape == expected.shape == (3, 224, 224)
    difference = (got - expected).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01  # rounding only


async def test_the_model_sees_the_same_top1_as_the_reference_pipeline(
    photo_jpegs: dict[str, bytes], engine: Engine, reference_model: torch.nn.Module
) -> None:
    names = list(photo_jpegs)
    predictions = await engine.predict([ours(photo_jpegs[n]).numpy() for n in names])
    with torch.no_grad():
        reference = reference_model(torch.stack([reference_input(photo_jpegs[n]) for n in names]))
    assert [p.probs.argmax().item() for p in predictions] == reference.argmax(dim=1).tolist()


def test_large_jpegs_are_decoded_at_reduced_scale_close_to_the_reference(photos: dict[str, Image.Image]) -> None:
    for name in ("chelsea", "coffee", "astronaut"):
        image = photos[name]
        big = image.resize((image.width * 8, image.height * 8), Image.LANCZOS)
        data = as_jpeg(big, quality=92)
        decoded = decode(data, resize_size=RESNET18.resize_size, max_pixels=LIMIT).image
        assert min(decoded.size) >= 4 * RESNET18.resize_size  # 4x headroom kept
        assert decoded.size[0] < big.size[0]  # ...but not the full 8x decode
        difference = (normalised(ours(data)) - reference_input(data)).abs()
        # Measured on these photos: mean <= 0.0032, max <= 0.053 (about 3 grey levels).
        assert difference.mean() <= 0.005, name
        assert difference.max() <= 0.06, name


@pytest.mark.parametrize(
    ("fmt", "save_args", "lossless"),
    [("PNG", {}, True), ("BMP", {}, True), ("TIFF", {}, True), ("WEBP", {"lossless": True}, True),
     ("WEBP", {"quality": 90}, False), ("JPEG", {"quality": 95}, False), ("GIF", {}, False),
     ("AVIF", {"quality": 90}, False), ("HEIF", {"quality": 90}, False)],
)
def test_every_supported_format_is_detected_from_the_bytes(
    photos: dict[str, Image.Image], fmt: str, save_args: dict[str, object], lossless: bool
) -> None:
    original = photos["chelsea"]
    result = preprocess(encode(original, fmt, **save_args), RESNET18, max_pixels=LIMIT)
    assert (result.format, result.width, result.height) == (fmt, 451, 300)
    expected = ours(encode(original, "PNG")).float()
    error = (torch.from_numpy(result.pixels).float() - expected).abs().mean()
    assert error == 0 if lossless else error < 12


def test_a_fresh_process_decodes_every_format_importing_only_their_plugins(tmp_path: Path) -> None:
    """Start-up imports Pillow's plugins for our formats only (all ~40 cost ~30 ms); each still decodes,
    a camera's MPO JPEG included."""
    image = Image.new("RGB", (64, 48), "red")
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF"):
        image.save(tmp_path / fmt, fmt)
    image.save(tmp_path / "MPO", "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48), "blue")])
    script = (
        "import sys, pathlib\n"
        "from resnet_serve.decode import decode\n"
        "for path in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n"
        "    d = decode(path.read_bytes(), resize_size=32, max_pixels=10**6)\n"
        "    print(path.name, d.format, d.width, d.height)\n"
        "print(*sorted(m for m in sys.modules if m.endswith('ImagePlugin')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.splitlines()
    assert out[:-1] == [f"{fmt} {fmt} 64 48" for fmt in ("AVIF", "BMP", "GIF", "JPEG", "MPO", "PNG", "TIFF", "WEBP")]
    assert set(out[-1].split()) == {f"PIL.{name}ImagePlugin" for name in ("Avif", "Bmp", "Gif", "Jpeg", "Mpo", "Png",
                                                                           "Ppm", "Tiff", "WebP")}


def test_only_the_first_frame_of_an_animation_is_used() -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = ours(buffer.getvalue())
    assert pixels[0].float().mean() > 240 and pixels[2].float().mean() < 15


def test_exif_orientation_is_applied(photos: dict[str, Image.Image]) -> None:
    upright = photos["chelsea"]
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = preprocess(as_jpeg(stored, quality=95, exif=exif.tobytes()), RESNET18, max_pixels=LIMIT)
    assert (rotated.width, rotated.height) == upright.size
    expected = ours(as_jpeg(upright, quality=95)).float()
    assert (torch.from_numpy(rotated.pixels).float() - expected).abs().mean() < 3


def test_an_iphone_photo_comes_out_upright(photos: dict[str, Image.Image]) -> None:
    """A HEIC with EXIF orientation 6 (the heif extra): libheif turns it and resets the tag, so it
    is not turned twice."""
    upright = photos["chelsea"]
    exif = Image.Exif()
    exif[0x0112] = 6
    heic = encode(upright.transpose(Image.Transpose.ROTATE_90), "HEIF", quality=95, exif=exif.tobytes())
    assert heic[4:12] == b"ftypheic"
    rotated = preprocess(heic, RESNET18, max_pixels=LIMIT)
    assert (rotated.format, rotated.width, rotated.height) == ("HEIF", *upright.size)
    expected = ours(as_jpeg(upright, quality=95)).float()
    assert (torch.from_numpy(rotated.pixels).float() - expected).abs().mean() < 3


def test_greyscale_palette_and_cmyk_become_rgb(photos: dict[str, Image.Image]) -> None:
    image = photos["coffee"]
    for mode in ("L", "P", "CMYK"):
        converted = image.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        pixels = ours(encode(converted, fmt))
        assert pixels.shape == (3, 224, 224), mode
        if mode == "L":
            assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    cmyk = ours(encode(image.convert("CMYK"), "JPEG", quality=95)).float()
    assert (cmyk - ours(encode(image, "PNG")).float()).abs().mean() < 6


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 300, 150))  # top half opaque blue, bottom transparent
    pixels = ours(encode(rgba, "PNG"))
    assert pixels[:, -10:, :].float().mean() == 255  # transparent red shows as white
    assert pixels[2, :10, :].float().mean() == 255 and pixels[0, :10, :].float().mean() == 0
    la = ours(encode(Image.new("LA", (300, 300), (0, 0)), "PNG"))
    assert la.float().mean() == 255


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (256, 1))
    sixteen = Image.fromarray(ramp)
    assert sixteen.mode.startswith("I")
    pixels = ours(encode(sixteen, "PNG"))
    eight = ours(encode(Image.fromarray((ramp // 257).astype(np.uint8)), "PNG"))
    assert (pixels.int() - eight.int()).abs().max() <= 1
    assert pixels.max() > 200  # bright end survives


def test_one_pixel_images_work() -> None:
    assert ours(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")).shape == (3, 224, 224)


@pytest.mark.parametrize(
    ("data", "error"),
    [(b"", InvalidImage), (bytes(range(256)) * 8, UnsupportedMediaType),
     (b"just some text, renamed to .jpg", UnsupportedMediaType)],
)
def test_non_images_are_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        preprocess(data, RESNET18, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_invalid(photos: dict[str, Image.Image], fmt: str) -> None:
    data = encode(photos["astronaut"], fmt)
    with pytest.raises(InvalidImage):
        preprocess(data[: len(data) // 2], RESNET18, max_pixels=LIMIT)


def test_the_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    data = encode(Image.new("L", (400, 300)), "PNG")
    with pytest.raises(PayloadTooLarge, match="400x300"):
        preprocess(data, RESNET18, max_pixels=400 * 300 - 1)
    assert preprocess(data, RESNET18, max_pixels=400 * 300).width == 400
