"""Labels: 1000 English names from torchvision and a Chinese name for every class; the label
files users bring (.txt, .json, .tsv) and the mistakes in them that are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torchvision.models import ResNet18_Weights

from resnet_serve.labels import imagenet_labels, read_labels, write_labels
from resnet_serve.spec import RESNET18

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_every_class_has_an_english_and_a_chinese_name() -> None:
    labels = RESNET18.labels
    assert len(labels) == len(labels.zh) == 1000
    assert labels.en == RESNET18.categories
    assert all(CJK.search(name) for name in labels.zh if name not in ("iPod",))
    assert len(set(labels.zh)) == 1000  # no two classes share a Chinese name


def test_the_table_lines_up_with_torchvisions_categories() -> None:
    torchvision_names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert list(enumerate(imagenet_labels().en)) == list(enumerate(torchvision_names))
    assert RESNET18.categories == tuple(torchvision_names)


def test_well_known_translations() -> None:
    labels = RESNET18.labels
    assert labels.name(281, "zh") == "虎斑猫" and labels.name(281, "en") == "tabby"
    assert labels.name(970, "zh") == "高山" and labels.name(970, "en") == "alp"
    assert labels.zh[207] == "金毛寻回犬"
    assert labels.zh[388] == "大熊猫"
    assert labels.zh[134] == "鹤" and labels.zh[517] == "起重机"  # crane bird vs crane machine


@pytest.mark.parametrize(
    ("name", "text", "en", "zh"),
    [
        ("flowers.txt", "daisy\nrose\n tulip \n", ("daisy", "rose", "tulip"), ("daisy", "rose", "tulip")),
        ("flowers.json", '["daisy", "rose"]', ("daisy", "rose"), ("daisy", "rose")),
        ("flowers.json", '{"1": "rose", "0": "daisy"}', ("daisy", "rose"), ("daisy", "rose")),
        ("flowers.tsv", "# id\tname\tzh\n1\trose\t玫瑰\n0\tdaisy\n", ("daisy", "rose"), ("daisy", "玫瑰")),
    ],
)
def test_label_files_in_every_format(tmp_path: Path, name: str, text: str, en: tuple[str, ...],
                                     zh: tuple[str, ...]) -> None:
    (tmp_path / name).write_text(text, "utf-8")
    labels = read_labels(tmp_path / name)
    assert (labels.en, labels.zh) == (en, zh)  # no Chinese name: the English one shows


@pytest.mark.parametrize("name", ["FLOWERS.TXT", "flowers.tsv"])
def test_label_files_saved_on_windows_read_as_written(tmp_path: Path, name: str) -> None:
    """A BOM, CRLF line ends, blank lines at the end, an upper-case suffix."""
    rows = ["daisy", "rose"] if name.endswith("TXT") else ["0\tdaisy\t雏菊", "1\trose\t玫瑰"]
    (tmp_path / name).write_bytes("\ufeff".encode() + "\r\n".join([*rows, "", ""]).encode())
    assert read_labels(tmp_path / name).en == ("daisy", "rose")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.txt", "daisy\n\nrose\n", "class 1 has a blank name"),
        ("a.txt", "daisy\nrose\ndaisy\n", "classes 0 and 2 are both named 'daisy'"),
        ("a.txt", "", "names no classes"),
        ("a.json", '{"0": "a", "2": "b"}', "0..N-1"),
        ("a.json", '{"cat": "a"}', "class indices"),
        ("a.json", '[1, 2]', "list of names"),
        ("a.tsv", "0\tcat\n0\tdog\n", "0..N-1"),
        ("a.tsv", "cat\tdog\n", "index<TAB>english"),
        ("a.csv", "cat,dog", ".txt, .json or .tsv"),
    ],
)
def test_label_files_that_would_mislead_are_refused(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text, "utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        read_labels(tmp_path / name)


def test_the_tsv_written_keeps_both_languages(tmp_path: Path) -> None:
    write_labels(imagenet_labels(), tmp_path / "labels.tsv")
    assert read_labels(tmp_path / "labels.tsv") == imagenet_labels()
