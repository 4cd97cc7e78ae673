"""Class names in English (torchvision's weights metadata) and Chinese (a data file we ship).

``data/imagenet_labels.tsv`` repeats the English name beside each Chinese one so that a
misaligned row is caught by a test, not by a user reading "虎斑猫" under a picture of a car.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Literal

from resnet_serve.weights import ModelSpec

Language = Literal["en", "zh"]
LABELS_FILE = "imagenet_labels.tsv"


@dataclass(frozen=True)
class Labels:
    en: tuple[str, ...]
    zh: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.en)

    def name(self, class_id: int, lang: Language) -> str:
        return self.zh[class_id] if lang == "zh" else self.en[class_id]


def read_label_table() -> list[tuple[int, str, str]]:
    """Rows ``(class_id, english, chinese)`` of the shipped label file."""
    text = resources.files("resnet_serve.data").joinpath(LABELS_FILE).read_text("utf-8")
    rows = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        class_id, english, chinese = line.split("\t")
        rows.append((int(class_id), english, chinese))
    return rows


def load_labels(spec: ModelSpec) -> Labels:
    """English names from the spec; Chinese names from the table, checked against them."""
    rows = read_label_table()
    if [(r[0], r[1]) for r in rows] != list(enumerate(spec.categories)):
        raise ValueError(f"{LABELS_FILE} does not line up with {spec.name}'s categories")
    return Labels(en=spec.categories, zh=tuple(r[2] for r in rows))
