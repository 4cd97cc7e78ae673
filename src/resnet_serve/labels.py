"""Class names, in English and (where a table gives them) Chinese.

The ImageNet table ``data/imagenet_labels.tsv`` repeats the English name beside each Chinese one,
so a misaligned row is caught by a test, not by a user reading "虎斑猫" under a picture of a car.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Literal

Language = Literal["en", "zh"]
IMAGENET_TABLE = "imagenet_labels.tsv"


@dataclass(frozen=True)
class Labels:
    """One name per class index; ``zh`` repeats the English name where there is no Chinese one."""

    en: tuple[str, ...]
    zh: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.en) != len(self.zh):
            raise ValueError(f"{len(self.en)} English names but {len(self.zh)} Chinese ones")

    def __len__(self) -> int:
        return len(self.en)

    def name(self, class_id: int, lang: Language) -> str:
        return self.zh[class_id] if lang == "zh" else self.en[class_id]


def read_label_table() -> list[tuple[int, str, str]]:
    """Rows ``(class_id, english, chinese)`` of the shipped ImageNet table."""
    text = resources.files("resnet_serve.data").joinpath(IMAGENET_TABLE).read_text("utf-8")
    rows = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        class_id, english, chinese = line.split("\t")
        rows.append((int(class_id), english, chinese))
    return rows


@functools.cache
def imagenet_labels() -> Labels:
    """The 1000 ImageNet-1k classes in torchvision's order, English and Chinese."""
    rows = read_label_table()
    if [r[0] for r in rows] != list(range(len(rows))):
        raise ValueError(f"{IMAGENET_TABLE} is not numbered 0..{len(rows) - 1} in order")
    return Labels(en=tuple(r[1] for r in rows), zh=tuple(r[2] for r in rows))
