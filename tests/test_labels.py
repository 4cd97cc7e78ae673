"""Labels: 1000 English names from torchvision and a Chinese name for every class."""

from __future__ import annotations

import re

from torchvision.models import ResNet18_Weights

from resnet_serve.labels import read_label_table
from resnet_serve.spec import RESNET18

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_every_class_has_an_english_and_a_chinese_name() -> None:
    labels = RESNET18.labels
    assert len(labels) == len(labels.zh) == 1000
    assert labels.en == RESNET18.categories
    assert all(CJK.search(name) for name in labels.zh if name not in ("iPod",))
    assert len(set(labels.zh)) == 1000  # no two classes share a Chinese name


def test_the_table_lines_up_with_torchvisions_categories() -> None:
    rows = read_label_table()
    torchvision_names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert [(i, en) for i, en, _ in rows] == list(enumerate(torchvision_names))
    assert RESNET18.categories == tuple(torchvision_names)


def test_well_known_translations() -> None:
    labels = RESNET18.labels
    assert labels.name(281, "zh") == "虎斑猫" and labels.name(281, "en") == "tabby"
    assert labels.name(970, "zh") == "高山" and labels.name(970, "en") == "alp"
    assert labels.zh[207] == "金毛寻回犬"
    assert labels.zh[388] == "大熊猫"
    assert labels.zh[134] == "鹤" and labels.zh[517] == "起重机"  # crane bird vs crane machine
