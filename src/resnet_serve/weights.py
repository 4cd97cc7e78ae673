"""Where a model's weights file is, and whether it is the one it claims to be (no torch here).

Search order for a spec's official file:
    1. ``RESNET_SERVE_WEIGHTS`` (an explicit path)
    2. ``<weights_dir>/<spec.filename>``
    3. torch hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``, as torch computes it)
Loading, downloading and the random-init fallback need torch and live in
``backends.torch.checkpoints``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from resnet_serve.errors import WeightsError
from resnet_serve.spec import ModelSpec, hash_in_name

WeightsSource = Literal["official", "custom", "random-init"]
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from, for ``/model`` and the ``X-Model-Weights`` header."""

    source: WeightsSource
    path: Path | None
    sha256: str | None

    @property
    def is_random(self) -> bool:
        return self.source == "random-init"


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_file(path: Path) -> str:
    """Check the file's SHA-256 against the hash in its name; return the full digest."""
    digest = sha256_of(path)
    expected = hash_in_name(path.name)
    if expected is not None and not digest.startswith(expected):
        raise WeightsError(
            f"{path}: SHA-256 {digest[:16]}... does not match the hash {expected!r} in its "
            "name; the file is corrupt, truncated or tampered with. Delete it and run "
            "'resnet-serve download-weights'."
        )
    return digest


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder, computed as ``torch.hub.get_dir()`` does."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints"


def candidate_paths(spec: ModelSpec, weights_dir: Path) -> list[Path]:
    """Where the official file may already be, in the order they are searched."""
    return [weights_dir / spec.filename, hub_checkpoint_dir() / spec.filename]


def file_info(path: Path, spec: ModelSpec) -> WeightsInfo:
    """A verified file's provenance: official if its hash is the spec's official one."""
    digest = verify_file(path)
    official = spec.url is not None and digest.startswith(spec.sha256_prefix)
    return WeightsInfo("official" if official else "custom", path, digest)


def locate(spec: ModelSpec, *, weights: Path | None, weights_dir: Path, random: bool) -> WeightsInfo | None:
    """The weights the settings point to, if they are on disk (None: only a download or the
    random-init fallback could tell, and both need torch)."""
    if random:
        return WeightsInfo("random-init", None, None)
    if weights is not None:
        return file_info(weights, spec) if weights.is_file() else None
    return next((file_info(p, spec) for p in candidate_paths(spec, weights_dir) if p.is_file()), None)
