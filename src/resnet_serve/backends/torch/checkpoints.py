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
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from resnet_serve.backends.torch.graph import build_network, build_network_of
from resnet_serve.errors import WeightsError
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec, hash_in_name
from resnet_serve.weights import (
    RANDOM_INIT_SEED,
    WeightsInfo,
    candidate_paths,
    file_info,
    hub_checkpoint_dir,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedWeights:
    """A state_dict and its provenance; the state_dict is dropped once the model is built."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    info: WeightsInfo


# Where training scripts keep the state_dict inside a checkpoint dict, most common first
# ("model_state_dict": PyTorch's own recipe for a general checkpoint).
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "model_ema", "state_dict_ema")
# Prefixes that wrappers add to every key: DataParallel/DDP, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED_KEYS = 5


def read_checkpoint(path: Path, architecture: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file, unwrapped from the containers users have; given the
    ``architecture``, also from under the attribute a training module kept the network in
    (PyTorch Lightning's ``model.``: see ``_network_within``).

    Loading never runs code from the file (``weights_only``); a file holding a whole pickled
    model is refused with a message saying how to save its state_dict instead."""
    safetensors = _is_safetensors(path)
    if not safetensors and not _is_torch_save(path):
        raise WeightsError(f"{path}: not a checkpoint (a file written by torch.save, or a safetensors file)")
    try:
        data = load_safetensors(path) if safetensors else torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: not a plain state_dict (it holds pickled objects, such as a whole model, which "
            "would run code from the file to load). Save the weights with "
            "torch.save(model.state_dict(), 'weights.pth') and use that file."
        ) from exc
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable PyTorch state_dict ({exc})") from exc
    for _ in range(2):  # {"model": {"state_dict": ...}} occurs too
        if isinstance(data, dict) and not _holds_tensors(data):
            data = next((data[k] for k in NESTED_KEYS if _holds_tensors(data.get(k), nested=True)), data)
    if not _holds_tensors(data):
        found = f"a dict of {', '.join(map(repr, list(data)[:8]))}" if isinstance(data, dict) else type(data).__name__
        raise WeightsError(f"{path}: expected a state_dict (or one under {', '.join(NESTED_KEYS)}), found {found}")
    state_dict = {_unprefixed(k): v for k, v in data.items() if isinstance(v, torch.Tensor) and k != "n_averaged"}
    return _network_within(state_dict, architecture, path) if architecture else state_dict


def _network_within(state_dict: dict[str, torch.Tensor], architecture: str, path: Path) -> dict[str, torch.Tensor]:
    """The network's tensors where a training module kept it as an attribute (every key under
    ``model.`` or ``net.``...): the one attribute whose keys hold all of the architecture's.
    A state_dict that has them at the top is returned as it is; one that has them nowhere too,
    for ``fit`` to say what does not fit."""
    with torch.device("meta"):  # the keys only: nothing allocated or initialised
        expected = build_network_of(architecture, 1000).state_dict().keys()
    if expected <= state_dict.keys():
        return state_dict
    within = {}
    for attribute in dict.fromkeys(k.split(".", 1)[0] for k in state_dict if "." in k):
        inner = {_unprefixed(k[len(attribute) + 1:]): v for k, v in state_dict.items() if k.startswith(f"{attribute}.")}
        if expected <= inner.keys():
            within[attribute] = inner
    if len(within) > 1:
        raise WeightsError(f"{path}: holds {len(within)} {architecture} networks ({', '.join(f'{a}.' for a in within)}); "
                           "save the one to serve with torch.save(model.state_dict(), 'weights.pth')")
    return next(iter(within.values()), state_dict)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file (Hugging Face's format, what ``save_file`` and its Trainer write),
    known by its start: the header's length, then the header's JSON object."""
    with path.open("rb") as file:
        start = file.read(9)
    return len(start) == 9 and start[8:] == b"{" and 2 <= int.from_bytes(start[:8], "little") < path.stat().st_size


def _is_torch_save(path: Path) -> bool:
    """What ``torch.save`` writes: a zip archive (since PyTorch 1.6), or before that a pickle,
    whose first opcode is PROTO (0x80). Anything else would only give pickle's puzzling errors."""
    with path.open("rb") as file:
        start = file.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80"


def _holds_tensors(data: object, *, nested: bool = False) -> bool:
    """A state_dict, or (``nested``) a dict with one inside it."""
    if not isinstance(data, dict):
        return False
    if any(isinstance(v, torch.Tensor) for v in data.values()):
        return True
    return nested and any(_holds_tensors(data.get(k)) for k in NESTED_KEYS)


def _unprefixed(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = next(key[len(p):] for p in WRAPPER_PREFIXES if key.startswith(p))
    return key


def head_key(net: torch.nn.Module) -> str:
    """The state_dict key of the classifier's output layer (its last Linear, or last conv)."""
    layers = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    if not layers:
        layers = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return f"{layers[-1]}.weight"


def head_size(state_dict: dict[str, torch.Tensor], architecture: str) -> int | None:
    """How many classes a checkpoint's head has, if its head layer is where the architecture's is."""
    key = head_key(build_network_of(architecture, 1000))
    return int(state_dict[key].shape[0]) if key in state_dict else None


def fit(state_dict: dict[str, torch.Tensor], spec: ModelSpec, source: str) -> None:
    """Check the state_dict fits the spec's network, with errors that say what does not."""
    net = build_network(spec)
    expected = net.state_dict()
    head = head_key(net)
    if head in state_dict and state_dict[head].shape[0] != spec.num_classes:
        raise WeightsError(f"{source}: the checkpoint's head ({head}) has {state_dict[head].shape[0]} classes, "
                           f"but there are {spec.num_classes} labels")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{source}: does not fit {spec.architecture}: {len(missing)} missing keys "
            f"{missing[:MAX_LISTED_KEYS]}, {len(unexpected)} unexpected keys {unexpected[:MAX_LISTED_KEYS]}"
        )
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state_dict.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise WeightsError(f"{source}: does not fit {spec.architecture}: {wrong[:MAX_LISTED_KEYS]}")


def load_state_dict(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Load a checkpoint and check it fits the spec's architecture and classes."""
    state_dict = read_checkpoint(path, spec.architecture)
    fit(state_dict, spec, str(path))
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
    info = file_info(path, spec)
    if explicit and info.source != "official" and hash_in_name(path.name) is None:
        logger.warning("%s has no hash in its name; its integrity cannot be verified", path)
    return LoadedWeights(load_state_dict(path, spec), info)


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
