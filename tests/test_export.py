"""Export: checkpoints as users have them, labels, geometry per architecture, validation against
eager PyTorch, and the model folder it writes (``backends.torch.export``, ``resnet-serve export``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from resnet_serve.backends.torch import export
from resnet_serve.backends.torch.checkpoints import read_checkpoint
from resnet_serve.cli import main
from resnet_serve.errors import WeightsError
from resnet_serve.repository import Repository
from resnet_serve.weights import sha256_of
from tests.conftest import FLOWERS, random_state_dict


def export_cli(*args: str) -> int:
    return main(["export", *args])


def test_two_users_models_export_into_one_repository(user_repository: Path, user_files: dict[str, Path]) -> None:
    repository = user_repository
    latest = Repository(repository).latest()
    assert set(latest) == {"flowers", "parts"}
    flowers, parts = latest["flowers"], latest["parts"]
    assert flowers.problem is None and parts.problem is None
    assert flowers.spec is not None and flowers.spec.labels.en == tuple(FLOWERS)
    assert parts.spec is not None and parts.spec.labels.en == ("bolt", "nut", "washer")
    meta = flowers.metadata
    assert meta is not None and (meta.architecture, meta.num_classes, meta.version) == ("resnet18", 5, 1)
    assert meta.weights.source == "custom" and meta.weights.sha256 == sha256_of(user_files["flowers"])
    assert meta.batching.max_batch_size == 2
    assert {(a.format, a.precision) for a in meta.artefacts} == {("torchscript", "fp32"), ("onnx", "fp32"),
                                                                  ("state_dict", "fp32"), ("cam", "fp32")}
    eager = meta.artefact("state_dict", "fp32")
    assert eager is not None and eager.validation is not None and eager.validation.max_abs_diff == 0.0
    for artefact in meta.artefacts:
        assert sha256_of(flowers.directory / artefact.file) == artefact.sha256
        assert artefact.validation is not None and artefact.validation.photos >= 8
        assert artefact.validation.max_abs_diff <= 1e-4 and artefact.validation.top1_agreement == 1.0
    assert (meta.geometry.resize_size, meta.geometry.crop_size, meta.geometry.interpolation) == (256, 224, "bilinear")


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_state_dict", "model", "net", "ema", "module.",
                                  "_orig_mod.", "averaged", "lightning"])
def test_checkpoints_in_every_container_users_have_load_the_same(tmp_path: Path, wrap: str) -> None:
    plain = random_state_dict("resnet18", 4, seed=1)
    saved: object = {
        "plain": plain,
        "state_dict": {"state_dict": plain, "optimizer": {"lr": torch.tensor(0.1)}, "epoch": 3},
        "model_state_dict": {"epoch": 3, "model_state_dict": plain, "optimizer_state_dict": {"state": {}}},
        "lightning": {"epoch": 3, "state_dict": {"criterion.weight": torch.ones(4),
                                                 **{f"model.{k}": v for k, v in plain.items()}}},
        "model": {"model": plain}, "net": {"net": plain}, "ema": {"ema": plain, "model": {"x": 1}},
        "module.": {f"module.{k}": v for k, v in plain.items()},
        "_orig_mod.": {f"_orig_mod.module.{k}": v for k, v in plain.items()},
        "averaged": {"n_averaged": torch.tensor(5), **{f"module.{k}": v for k, v in plain.items()}},
    }[wrap]
    torch.save(saved, tmp_path / "c.pth")
    loaded = read_checkpoint(tmp_path / "c.pth", "resnet18")
    assert loaded.keys() == plain.keys() and all(torch.equal(loaded[k], plain[k]) for k in plain)


@pytest.mark.parametrize("name", ["model.safetensors", "renamed.pt"])
def test_safetensors_files_load_the_same_whatever_their_name(tmp_path: Path, name: str) -> None:
    plain = random_state_dict("resnet18", 4, seed=1)
    save_file({f"model.{k}": v.contiguous() for k, v in plain.items()}, tmp_path / name)
    loaded = read_checkpoint(tmp_path / name, "resnet18")
    assert loaded.keys() == plain.keys() and all(torch.equal(loaded[k], plain[k]) for k in plain)


def test_a_checkpoint_with_two_networks_or_none_says_so(tmp_path: Path) -> None:
    plain = random_state_dict("resnet18", 4, seed=1)
    torch.save({"state_dict": {f"{a}.{k}": v for a in ("student", "teacher") for k, v in plain.items()}}, tmp_path / "kd.pt")
    with pytest.raises(WeightsError, match=r"holds 2 resnet18 networks \(student\., teacher\.\)"):
        read_checkpoint(tmp_path / "kd.pt", "resnet18")
    torch.save({"epoch": 1, "weights": plain}, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match=r"under state_dict, model_state_dict, .*found a dict of 'epoch', 'weights'"):
        read_checkpoint(tmp_path / "odd.pt", "resnet18")


def test_a_pickled_whole_model_is_refused_with_how_to_save_a_state_dict(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=3), tmp_path / "whole.pt")
    with pytest.raises(WeightsError, match=r"torch.save\(model.state_dict\(\)"):
        read_checkpoint(tmp_path / "whole.pt")


def test_a_file_that_is_no_checkpoint_is_called_so_and_a_legacy_one_loads(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\n")  # the wrong file given as --weights
    with pytest.raises(WeightsError, match=r"labels.txt: not a checkpoint \(a file written by torch.save, or a safetensors"):
        read_checkpoint(tmp_path / "labels.txt")
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # PyTorch < 1.6's format
    assert read_checkpoint(tmp_path / "old.pth").keys() == state.keys()


@pytest.mark.parametrize(("flags", "message"), [
    (["--precision", "int9"], "argument --precision: int9: choose from fp32,int8,bf16,fp16"),
    (["--format", "xml"], "argument --format: xml: choose from torchscript,onnx,state_dict"),
    (["--format", "onnx", "--precision", "fp16"], "ONNX artefacts are fp32 or int8, not fp16"),
    (["--version", "0"], "argument --version: '0': give a whole number of at least 1"),
    (["--crop", "0"], "error: --crop: Input should be greater than 0"),
    (["--crop", "300"], "error: the crop (300) exceeds the resize (256): it would pad"),
    (["--std", "0", "1", "1"], "error: --std: Input should be greater than 0"),  # would divide by zero: NaN
    (["--max-batch-size", "0"], "error: --max-batch-size: Input should be greater than or equal to 1"),
])
def test_export_flags_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            flags: list[str], message: str) -> None:
    try:
        status = export_cli("--weights", "random", "--repository", str(tmp_path), *flags)
    except SystemExit as exc:  # argparse's own exit for a bad argument
        status = exc.code
    assert status == 2 and message in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_weights_with_nan_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = random_state_dict("resnet18", 3, seed=1)
    state["fc.weight"][0, 0] = float("nan")  # as a diverged fine-tuning leaves
    torch.save(state, tmp_path / "diverged.pt")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    assert export_cli("--weights", str(tmp_path / "diverged.pt"), "--labels", str(tmp_path / "labels.txt"),
                      "--name", "diverged", "--repository", str(tmp_path / "repo")) == 2
    assert "NaN or infinite probabilities" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "diverged" / "1").exists()


def test_an_fp16_export_has_no_onnx_artefact_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli("--weights", "random", "--precision", "fp16", "--repository", str(tmp_path)) == 0
    written = sorted(p.name for p in (tmp_path / "resnet18" / "1").iterdir())
    assert "model.fp16.pt" in written and not [n for n in written if n.endswith(".onnx")]


def test_export_reads_a_lightning_checkpoint_s_network(user_files: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Under ``model.``: export sees its 7-class head (not a network that does not fit)."""
    seven = read_checkpoint(user_files["seven"])
    torch.save({"epoch": 9, "state_dict": {f"model.{k}": v for k, v in seven.items()}}, tmp_path / "last.ckpt")
    assert export_cli("--weights", str(tmp_path / "last.ckpt"), "--name", "seven", "--repository", str(tmp_path)) == 2
    assert "--labels is required: the checkpoint's head has 7 classes" in capsys.readouterr().err


def test_a_head_that_does_not_match_the_labels_is_refused(user_files: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli("--weights", str(user_files["seven"]), "--labels", str(user_files["flowers_labels"]),
                      "--name", "seven", "--repository", str(tmp_path)) == 2
    error = capsys.readouterr().err
    assert "has 7 classes" in error and "5 labels" in error
    assert not (tmp_path / "seven").exists()


def test_labels_are_required_for_a_head_other_than_imagenets(user_files: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli("--weights", str(user_files["seven"]), "--repository", str(tmp_path)) == 2
    assert "--labels is required: the checkpoint's head has 7 classes" in capsys.readouterr().err


def test_keys_of_another_architecture_are_listed(user_files: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli("--arch", "mobilenet_v3_small", "--weights", str(user_files["flowers"]), "--labels",
                      str(user_files["flowers_labels"]), "--repository", str(tmp_path)) == 2
    error = capsys.readouterr().err
    assert "does not fit mobilenet_v3_small" in error and "missing keys" in error and "unexpected keys" in error
    assert "'features.0.0.weight'" in error and "'conv1.weight'" in error


def test_geometry_comes_from_torchvisions_weights_per_architecture() -> None:
    efficientnet = export.default_geometry("efficientnet_b0")
    transforms = torchvision.models.EfficientNet_B0_Weights.DEFAULT.transforms()
    assert (efficientnet.resize_size, efficientnet.crop_size) == (transforms.resize_size[0], transforms.crop_size[0])
    assert efficientnet.interpolation == "bicubic"
    assert export.default_geometry("resnet18").interpolation == "bilinear"


def test_geometry_flags_override_and_are_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli("--weights", "random", "--name", "wide", "--repository", str(tmp_path), "--format",
                      "torchscript", "--resize", "288", "--crop", "256", "--interpolation", "bicubic",
                      "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25") == 0
    captured = capsys.readouterr()
    assert "wide: building torchscript fp32" in captured.err and "wrote" in captured.out  # progress, then a summary
    version = Repository(tmp_path).latest()["wide"]
    assert version.metadata is not None and version.metadata.weights.source == "random-init"
    g = version.metadata.geometry
    assert (g.resize_size, g.crop_size, g.interpolation, g.mean, g.std) == (288, 256, "bicubic", (0.5,) * 3, (0.25,) * 3)
    assert version.spec is not None and version.spec.labels.en[281] == "tabby"  # ImageNet's, for 1000 classes


def test_a_new_export_is_a_new_version_and_a_version_keeps_its_weights(
    user_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--weights", str(user_files["flowers"]), "--labels", str(user_files["flowers_labels"]),
              "--name", "flowers", "--repository", str(tmp_path), "--format", "torchscript"]
    assert export_cli(*common) == 0 and export_cli(*common) == 0
    assert sorted(p.name for p in (tmp_path / "flowers").iterdir()) == ["1", "2"]
    assert export_cli("--weights", "random", "--labels", str(user_files["flowers_labels"]), "--name", "flowers",
                      "--repository", str(tmp_path), "--version", "1") == 2
    assert "already holds another model" in capsys.readouterr().err
    assert export_cli(*common, "--version", "1", "--precision", "bf16") == 0  # same weights: the version grows
    artefacts = Repository(tmp_path).versions()[0].metadata.artefacts  # type: ignore[union-attr]
    assert {a.precision for a in artefacts} == {"fp32", "bf16"}


def test_the_explained_layer_is_checked_and_recorded(user_files: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--weights", str(user_files["flowers"]), "--labels", str(user_files["flowers_labels"]),
              "--name", "flowers", "--repository", str(tmp_path), "--format", "state_dict"]
    assert export_cli(*common, "--explain-layer", "layer9") == 2
    assert "no module 'layer9'" in capsys.readouterr().err and not (tmp_path / "flowers" / "1").exists()
    assert export_cli(*common, "--explain-layer", "layer3") == 0
    (version,) = Repository(tmp_path).versions()
    assert version.metadata is not None and version.metadata.explain_layer == "layer3"
    assert [a.file for a in version.metadata.artefacts] == ["model.fp32.state_dict.pt"]


@pytest.mark.parametrize("name", ["../etc", "Flowers", ".hidden", "a/b", "x" * 65])
def test_model_names_are_limited(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli("--weights", "random", "--name", name, "--repository", str(tmp_path)) == 2
    assert "model name" in capsys.readouterr().err


def test_an_unknown_architecture_gets_close_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli("--arch", "resnet81", "--weights", "random", "--repository", str(tmp_path)) == 2
    assert "did you mean" in capsys.readouterr().err


def test_an_fp32_artefact_that_differs_from_eager_pytorch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A faulty compilation (simulated: its output is off by 1e-3) must not reach a repository."""
    run = export._run_artefact
    monkeypatch.setattr(export, "_run_artefact", lambda *args: run(*args) + 1e-3)
    assert export_cli("--weights", "random", "--repository", str(tmp_path), "--format", "torchscript") == 2
    assert "refusing to write it" in capsys.readouterr().err
    assert not (tmp_path / "resnet18" / "1").exists()


def test_the_models_command_lists_torchvisions_classifiers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16"} <= set(names)
    assert "maskrcnn_resnet50_fpn" not in names  # detection, not classification
    assert any(line.startswith("efficientnet_b0") and "bicubic" in line for line in lines)


def quantized_convolution(channels: int, kernel: int, stride: int, pad: int, size: int) -> bytes:
    """A QDQ graph as ONNX Runtime's quantizer writes one: float pixels quantized, one INT8
    convolution with per-channel weights, its output dequantized."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(kernel * 100 + pad * 10 + channels)
    constants = [numpy_helper.from_array(rng.integers(-64, 64, (16, channels, kernel, kernel), dtype=np.int8), "w"),
                 numpy_helper.from_array(rng.uniform(0.001, 0.01, 16).astype(np.float32), "w_scale"),
                 numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(120, np.uint8), "x_zero"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
                 numpy_helper.from_array(np.array(0, np.uint8), "y_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                              pads=[pad] * 4, name="stem"),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["out"])]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["batch", channels, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 16, "height", "width"])],
                              constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize(("channels", "kernel", "stride", "pad", "size", "rewritten"), [
    (3, 7, 2, 3, 32, True),  # ResNet's stem: odd padding
    (3, 5, 2, 2, 30, True),  # even padding
    (4, 3, 2, 1, 16, True),
    (3, 4, 2, 1, 16, True),  # even kernel
    (3, 3, 2, 0, 18, True),  # no padding
    (3, 7, 1, 3, 32, False),  # stride 1
    (8, 7, 2, 3, 32, False),  # too many channels to gain
    (3, 7, 2, 3, 31, False),  # odd size: no 2×2 blocks
])
def test_the_int8_stem_becomes_a_space_to_depth_with_the_same_answers(
    channels: int, kernel: int, stride: int, pad: int, size: int, rewritten: bool
) -> None:
    import onnx
    import onnxruntime as ort

    from resnet_serve.backends.torch.onnx_export import stem_to_space_to_depth

    exported = quantized_convolution(channels, kernel, stride, pad, size)
    model = onnx.ModelProto.FromString(exported)
    assert stem_to_space_to_depth(model) is rewritten
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert ("SpaceToDepth" in ops) is rewritten and ops.count("DequantizeLinear") == 3
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    if rewritten:
        strides = next(a for a in conv.attribute if a.name == "strides")
        assert list(strides.ints) == [1, 1] and conv.input[0].endswith("_space_to_depth_dequantized")
    x = np.random.default_rng(0).normal(0, 1, (2, channels, size, size)).astype(np.float32)
    before, after = (ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                     for graph in (exported, model.SerializeToString()))
    assert before.shape == after.shape and np.array_equal(before, after)
