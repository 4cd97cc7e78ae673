"""Class names, in English and (where a table gives them) Chinese, and the label files users have.

The ImageNet table ``data/imagenet_labels.tsv`` repeats the English name beside each Chinese one,
so a misaligned row is caught by a test, not by a user reading "虎斑猫" under a picture of a car.

Label files (``read_labels``): ``.txt`` one name per line; ``.json`` a list, or an object
``{"0": "name", ...}``; ``.tsv`` rows of index, English name and an optional Chinese name (lines
starting with ``#`` are comments). A class without a Chinese name shows its English one.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
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


def _checked(en: list[str], zh: list[str], source: str) -> Labels:
    """Labels, after refusing what would confuse a user: no names, blank names, two classes with
    the same name (ImageNet's two English "crane"s pass: their Chinese names tell them apart)."""
    if not en:
        raise ValueError(f"{source} names no classes")
    labels = Labels(en=tuple(en), zh=tuple(z.strip() or e for z, e in zip(zh, en)))
    seen: dict[tuple[str, str], int] = {}
    for index, pair in enumerate(zip(labels.en, labels.zh)):
        if not pair[0].strip():
            raise ValueError(f"{source}: class {index} has a blank name")
        if pair in seen:
            raise ValueError(f"{source}: classes {seen[pair]} and {index} are both named {pair[0]!r}")
        seen[pair] = index
    return labels


def _indexed(pairs: list[tuple[int, list[str]]], source: str) -> list[list[str]]:
    """Rows given by index, put in order; the indices must be exactly 0..N-1."""
    rows = dict(pairs)
    if len(rows) != len(pairs) or sorted(rows) != list(range(len(rows))):
        raise ValueError(f"{source}: class indices must be 0..N-1, each once")
    return [rows[i] for i in range(len(rows))]


def parse_tsv(text: str, source: str) -> Labels:
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) not in (2, 3) or not fields[0].strip().isdigit():
            raise ValueError(f"{source}:{number}: expected 'index<TAB>english[<TAB>chinese]'")
        pairs.append((int(fields[0]), [f.strip() for f in fields[1:]]))
    rows = _indexed(pairs, source)
    return _checked([r[0] for r in rows], [r[1] if len(r) > 1 else "" for r in rows], source)


def _parse_json(text: str, source: str) -> Labels:
    data = json.loads(text)
    if isinstance(data, dict):
        if not all(isinstance(k, str) and k.isdigit() for k in data):
            raise ValueError(f"{source}: an object's keys must be class indices (\"0\", \"1\", ...)")
        data = [row[0] for row in _indexed([(int(k), [v]) for k, v in data.items()], source)]
    if not isinstance(data, list) or not all(isinstance(name, str) for name in data):
        raise ValueError(f"{source}: expected a list of names or an object of index to name")
    return _checked(list(data), [""] * len(data), source)


def read_labels(path: Path) -> Labels:
    """The labels in a ``.txt``, ``.json`` or ``.tsv`` file (``ValueError`` says what is wrong)."""
    text = path.read_text("utf-8-sig")  # a BOM, as Windows editors write, is not part of a name
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return parse_tsv(text, path.name)
    if suffix == ".json":
        return _parse_json(text, path.name)
    if suffix == ".txt":
        names = text.rstrip().splitlines()  # CRLF too; blank lines at the end are not classes
        return _checked([n.strip() for n in names], [""] * len(names), path.name)
    raise ValueError(f"{path.name}: labels must be a .txt, .json or .tsv file")


def write_labels(labels: Labels, path: Path) -> None:
    """The ``.tsv`` form, which keeps both languages."""
    rows = [f"{i}\t{en}\t{zh}" for i, (en, zh) in enumerate(zip(labels.en, labels.zh))]
    path.write_text("# class_id\tenglish\tchinese\n" + "\n".join(rows) + "\n", "utf-8")


@functools.cache
def imagenet_labels() -> Labels:
    """The 1000 ImageNet-1k classes in torchvision's order, English and Chinese."""
    text = resources.files("resnet_serve.data").joinpath(IMAGENET_TABLE).read_text("utf-8")
    return parse_tsv(text, IMAGENET_TABLE)
