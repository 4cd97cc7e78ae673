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
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
