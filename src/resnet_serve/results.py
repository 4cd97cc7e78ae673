"""What the pipeline answers for one image, and the one top-k every endpoint uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageResult:
    """One image's probabilities, what the upload was, and where the time went."""

    probs: np.ndarray  # float32 [num_classes]
    format: str
    width: int
    height: int
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0
    cached: bool = False


def top_k(probs: np.ndarray, k: int) -> tuple[list[float], list[int]]:
    """The ``k`` largest probabilities of one vector and their class indices, largest first
    (equal values: lower index first)."""
    k = min(k, probs.shape[-1])
    candidates = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[-1] else np.arange(probs.shape[-1])
    order = candidates[np.lexsort((candidates, -probs[candidates]))]
    return probs[order].tolist(), order.tolist()
