"""Weights: the spec, hash verification (``weights``), the resolution order, download and the
fallback (``backends.torch.checkpoints``)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights

from resnet_serve.backends.torch.checkpoints import load_state_dict, random_init, resolve
from resnet_serve.backends.torch.graph import build_network
from resnet_serve.errors import WeightsError
from resnet_serve.settings import Settings
from resnet_serve.spec import RESNET18, ModelSpec, hash_in_name
from resnet_serve.weights import RANDOM_INIT_SEED, verify_file
from tests.conftest import write_seeded_weights


def spec_for(path: Path, base_url: str = "https://example.invalid/models") -> ModelSpec:
    """The real spec, but expecting ``path``'s file (and hash) instead of the official one."""
    return dataclasses.replace(RESNET18, url=f"{base_url}/{path.name}")


def offline(**overrides: object) -> Settings:
    return Settings(allow_download=False, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    return write_seeded_weights(tmp_path)


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep torch hub's real cache out of these tests."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_the_spec_is_torchvisions_resnet18_imagenet1k_v1() -> None:
    assert RESNET18.filename == "resnet18-f37072fd.pth"
    assert RESNET18.sha256_prefix == "f37072fd"
    assert RESNET18.url == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert (RESNET18.resize_size, RESNET18.crop_size) == (256, 224)
    assert RESNET18.mean == pytest.approx((0.485, 0.456, 0.406))
    assert RESNET18.std == pytest.approx((0.229, 0.224, 0.225))
    assert RESNET18.num_classes == 1000
    official = ResNet18_Weights.IMAGENET1K_V1  # the spec is written out so serving needs no torch
    transforms = official.transforms()
    assert RESNET18.url == official.url
    assert (RESNET18.resize_size, RESNET18.crop_size) == (transforms.resize_size[0], transforms.crop_size[0])
    assert (RESNET18.mean, RESNET18.std) == (tuple(transforms.mean), tuple(transforms.std))
    assert RESNET18.interpolation == transforms.interpolation.value
    assert RESNET18.categories == tuple(official.meta["categories"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18-f37072fd.pth", "f37072fd"), ("model-0123456789abcdef.pt", "0123456789abcdef"),
     ("resnet18.pth", None), ("resnet18-xyz.pth", None)],
)
def test_hash_in_name(name: str, expected: str | None) -> None:
    assert hash_in_name(name) == expected


def test_a_file_matching_its_name_verifies(weights_file: Path) -> None:
    digest = verify_file(weights_file)
    assert len(digest) == 64 and digest.startswith(hash_in_name(weights_file.name) or "-")


def test_a_tampered_file_is_refused(weights_file: Path) -> None:
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match"):
        verify_file(weights_file)


def test_a_truncated_file_is_refused(weights_file: Path) -> None:
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated or tampered"):
        resolve(spec_for(weights_file), offline(weights=weights_file))


def test_an_explicit_path_comes_first_and_loads_the_real_tensors(tmp_path: Path, weights_file: Path) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    shutil.copy(weights_file, other_dir / weights_file.name)
    loaded = resolve(spec_for(weights_file), offline(weights=weights_file, weights_dir=other_dir))
    assert loaded.info.path == weights_file
    assert loaded.info.source == "official"  # its hash is the one the spec expects
    expected = torch.load(weights_file, weights_only=True)
    assert torch.equal(loaded.state_dict["fc.weight"], expected["fc.weight"])


def test_an_explicit_file_that_is_not_the_specs_is_custom(weights_file: Path) -> None:
    loaded = resolve(RESNET18, offline(weights=weights_file))
    assert loaded.info.source == "custom"
    with pytest.raises(WeightsError, match="not the official"):
        resolve(RESNET18, offline(weights=weights_file, weights_mode="official"))


def test_a_missing_explicit_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        resolve(RESNET18, offline(weights=tmp_path / "nope.pth"))


def test_the_weights_dir_is_searched(tmp_path: Path, weights_file: Path) -> None:
    loaded = resolve(spec_for(weights_file), offline(weights_dir=weights_file.parent))
    assert (loaded.info.source, loaded.info.path) == ("official", weights_file)


def test_torch_hubs_checkpoint_cache_is_searched(tmp_path: Path, weights_file: Path, empty_torch_home: Path) -> None:
    cached = empty_torch_home / "hub" / "checkpoints" / weights_file.name
    cached.parent.mkdir(parents=True)
    shutil.move(weights_file, cached)
    loaded = resolve(spec_for(cached), offline(weights_dir=tmp_path / "empty"))
    assert (loaded.info.source, loaded.info.path) == ("official", cached)


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server standing in for download.pytorch.org."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_download_fetches_and_verifies_into_the_weights_dir(tmp_path: Path, weights_file: Path, file_server: tuple[str, Path]) -> None:
    url, root = file_server
    shutil.move(weights_file, root / weights_file.name)
    target_dir = tmp_path / "downloaded"
    loaded = resolve(spec_for(weights_file, url), Settings(weights_dir=target_dir))
    assert loaded.info.source == "official"
    assert loaded.info.path == target_dir / weights_file.name
    assert verify_file(target_dir / weights_file.name) == loaded.info.sha256


def test_a_corrupt_download_is_refused(tmp_path: Path, weights_file: Path, file_server: tuple[str, Path]) -> None:
    url, root = file_server
    (root / weights_file.name).write_bytes(b"not the weights")
    spec = spec_for(weights_file, url)
    with pytest.raises(WeightsError, match="could not download"):
        resolve(spec, Settings(weights_dir=tmp_path / "d", weights_mode="official"))
    assert not (tmp_path / "d" / weights_file.name).exists()


def test_auto_mode_falls_back_to_random_init_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        loaded = resolve(RESNET18, offline(weights_dir=tmp_path))
    assert loaded.info.source == "random-init" and loaded.info.is_random
    assert "RANDOM-INIT" in caplog.text


def test_official_mode_refuses_to_start_without_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="resnet18-f37072fd.pth"):
        resolve(RESNET18, offline(weights_dir=tmp_path, weights_mode="official"))


def test_random_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    first, second = random_init(RESNET18), random_init(RESNET18)
    assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(first.state_dict["fc.weight"], second.state_dict["fc.weight"])
    torch.manual_seed(RANDOM_INIT_SEED)
    assert torch.equal(first.state_dict["fc.weight"], build_network(RESNET18).state_dict()["fc.weight"])


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    path.write_text("hello")
    with pytest.raises(WeightsError, match="not a checkpoint"):
        load_state_dict(path, RESNET18)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    path.write_bytes(path.read_bytes()[:200])  # a download cut short
    with pytest.raises(WeightsError, match="not a loadable PyTorch state_dict"):
        load_state_dict(path, RESNET18)


def test_a_state_dict_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        load_state_dict(path, RESNET18)


def test_a_spec_whose_crop_would_pad_is_refused() -> None:
    with pytest.raises(ValueError, match="crop_size 300 exceeds resize_size 256"):
        dataclasses.replace(RESNET18, crop_size=300)
