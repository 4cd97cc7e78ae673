"""An LRU cache of results, keyed by a hash of the uploaded bytes.

The same photo uploaded again (a retry, a popular image, a load test) skips decoding and
inference. The full probability vector is kept, so any ``top_k`` and language can be answered
from one entry. Lives on the event loop thread only; no lock.
"""

from __future__ import annotations

import hashlib

from cachetools import LRUCache

from resnet_serve.results import ImageResult


class ResultCache:
    """``size`` entries (0: off)."""

    def __init__(self, size: int) -> None:
        self._entries: LRUCache[bytes, ImageResult] | None = LRUCache(maxsize=size) if size else None

    @property
    def enabled(self) -> bool:
        return self._entries is not None

    @staticmethod
    def key(data: bytes) -> bytes:
        """SHA-256 (hardware-accelerated on current x86 and ARM CPUs, so faster than BLAKE2 there),
        truncated to 128 bits: collisions cannot be crafted to poison the cache."""
        return hashlib.sha256(data).digest()[:16]

    def get(self, key: bytes) -> ImageResult | None:
        return self._entries.get(key) if self._entries is not None else None

    def put(self, key: bytes, result: ImageResult) -> None:
        """Keep ``result`` as a hit would answer it: a copy of its probabilities (not a view that
        would keep the whole batch's array alive), no timings, ``cached``."""
        if self._entries is not None:
            self._entries[key] = ImageResult(result.probs.copy(), result.format, result.width, result.height,
                                             cached=True)

    def __len__(self) -> int:
        return len(self._entries) if self._entries is not None else 0
