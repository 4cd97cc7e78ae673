"""Weights as tensors: loading a verified file, downloading the official one, the fallback.

Resolution order for the state_dict (``resolve``):
    1. ``RESNET_SERVE_WEIGHTS`` (an explicit path)
    2. ``<weights_dir>/<spec.filename>``
    3. torch hub's checkpoint cache
    4. a download through torch hub with its hash check, into ``weights_dir``
Then, with ``weights_mode=auto``, a seeded random initialisation, reported loudly; with
``weights_mode=official`` a ``WeightsError``. Files are loaded with ``weights_only=True``: loading
never runs code from the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resnet_serve.backends.torch.graph import build_network
from resnet_serve.errors import WeightsError
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec, hash_in_name
from resnet_serve.weights import (
    RANDOM_INIT_SEED,
    WeightsInfo,
    WeightsSource,
    candidate_paths,
    hub_checkpoint_dir,
    verify_file,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedWeights:
    """A state_dict and its provenance; the state_dict is dropped once the model is built."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    info: WeightsInfo


def load_state_dict(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Load a verified file and check it fits the spec's architecture."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable PyTorch state_dict ({exc})") from exc
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{path}: expected a state_dict, found {type(state_dict).__name__}")
    try:
        build_network(spec).load_state_dict(state_dict)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: does not fit {spec.name}: {exc}") from exc
    return state_dict


def download(spec: ModelSpec, weights_dir: Path, *, progress: bool = True) -> Path:
    """Download the official file with torch hub's hash check; return its path."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = weights_dir / spec.filename
    try:
        torch.hub.download_url_to_file(str(spec.url), str(target), hash_prefix=spec.sha256_prefix, progress=progress)
    except Exception as exc:
        raise WeightsError(f"could not download {spec.url}: {exc}") from exc
    return target


def random_init(spec: ModelSpec) -> LoadedWeights:
    """A seeded random initialisation: reproducible, and never mistaken for the real thing."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(RANDOM_INIT_SEED)
        state_dict = build_network(spec).state_dict()
    finally:
        torch.random.set_rng_state(generator_state)
    return LoadedWeights(state_dict, WeightsInfo(source="random-init", path=None, sha256=None))


def _from_file(path: Path, spec: ModelSpec, *, explicit: bool) -> LoadedWeights:
    digest = verify_file(path)
    official = spec.url is not None and digest.startswith(spec.sha256_prefix)
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
    for path in candidate_paths(spec, settings.weights_dir):
        if path.is_file():
            return _from_file(path, spec, explicit=False)
    problem = f"no {spec.filename} in {settings.weights_dir} or {hub_checkpoint_dir()}"
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
