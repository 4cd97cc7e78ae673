"""ONNX export of the serving graph (the ``onnx`` package, in the ``torch`` extra), and its
static INT8 quantization with ONNX Runtime's quantizer (its stem then rewritten as a
space-to-depth, the same answers faster), and the patch that sends the INT8 graph's large
convolutions through ONNX Runtime's INT8 GEMM on CPUs with AMX (``backends.onnxruntime``).

The exported graph is the one the TorchScript backend runs: ``uint8`` NCHW pixels in, float32
probabilities out, with a dynamic batch dimension; for a model with a global-pool + linear head,
also the last block's activations (``features``), from which CAM explanations are made without
torch.
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resnet_serve.backends import GRAPH_FEATURES, GRAPH_INPUT, GRAPH_OUTPUT, ORT_INT8_SCHEME
from resnet_serve.backends.torch.checkpoints import LoadedWeights
from resnet_serve.backends.torch.gradcam import find_layer
from resnet_serve.backends.torch.graph import ServingNetwork, build_network
from resnet_serve.spec import ModelSpec

OPSET = 17
# Convolutions with at least this many inputs per output (input channels × kernel area) go
# through ONNX Runtime's INT8 GEMM on AMX CPUs: on a Xeon with AMX, ResNet-18's 3×3 convolutions
# from 128 channels up ran faster that way, its stem, its 64-channel stage and its 1×1
# shortcuts did not (benchmarks/ort_int8_bench.py).
GEMM_MIN_INPUTS = 1024
# INT8 convolutions of stride 2 over at most this many input channels (the stem over RGB) are
# rewritten as a space-to-depth and a convolution of stride 1 (``stem_to_space_to_depth``).
STEM_MAX_CHANNELS = 4


class _WithFeatures(nn.Module):
    """The serving graph that also returns the activations of one module (for CAM)."""

    def __init__(self, serving: ServingNetwork, layer: nn.Module) -> None:
        super().__init__()
        self.serving = serving
        self._seen: list[torch.Tensor] = []
        layer.register_forward_hook(lambda _m, _i, output: self._seen.append(output))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen.clear()
        probs = self.serving(pixels)
        return probs, self._seen[-1]


def export_onnx(spec: ModelSpec, weights: LoadedWeights, path: Path, features: str | None = None) -> Path:
    """Write the FP32 serving graph as ONNX; with ``features`` (a module's name), that module's
    activations as a second output."""
    net = build_network(spec)
    net.load_state_dict(weights.state_dict)
    model: nn.Module = ServingNetwork(net.eval(), spec, torch.float32, channels_last=False).eval()
    outputs = [GRAPH_OUTPUT]
    if features is not None:
        model, outputs = _WithFeatures(model, find_layer(net, features)[1]).eval(), [GRAPH_OUTPUT, GRAPH_FEATURES]
    example = torch.zeros(1, 3, spec.crop_size, spec.crop_size, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[GRAPH_INPUT], output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [GRAPH_INPUT, *outputs]},
        )
    return path


class _Photos:
    """Calibration batches for ONNX Runtime's quantizer (its CalibrationDataReader protocol)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self._batches = iter(np.split(pixels, len(pixels)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {GRAPH_INPUT: batch}


def quantize_onnx(fp32: Path, path: Path, calibration: np.ndarray) -> dict[str, str]:
    """Static INT8 (QDQ) of an exported FP32 graph, calibrated on real photos; what it ran with,
    and the graph's patch for AMX CPUs (``gemm_patch``), as the artefact records them.

    Weights are per channel. Activations are unsigned and weights signed with a reduced range
    (7 bits): x86 CPUs without VNNI multiply u8×s8 pairs with an instruction that saturates, and
    the reduced range keeps it from doing so; VNNI CPUs run the same graph."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_name(f".{path.name}.prepared")
    try:
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(path), _Photos(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=_head(onnx.load(str(prepared)).graph))
    finally:
        prepared.unlink(missing_ok=True)
    model = onnx.load(str(path))
    if stem_to_space_to_depth(model):
        onnx.save(model, str(path))
    return {"int8_backend": ORT_INT8_SCHEME, "ort_gemm_patch": gemm_patch(model)}


def stem_to_space_to_depth(model: Any, max_channels: int = STEM_MAX_CHANNELS) -> bool:
    """Rewrite each INT8 convolution of stride 2 over a few channels (ResNet's 7×7 stem over RGB)
    as a ``SpaceToDepth`` of its quantized input followed by a convolution of stride 1 over four
    times the channels; whether one was rewritten.

    The answers do not change: each 2×2 block of pixels becomes one pixel of 4C channels, the
    kernel is cut into the same blocks (with zero weights where it does not reach), so every
    output sums the same products; the per-channel weight scales stay. ONNX Runtime's INT8
    convolution kernels are slow over 3 channels and faster over 12 (the stem was ResNet-18's
    costliest convolution; benchmarks/ort_int8_bench.py times the graph with and without the
    rewrite). The space-to-depth runs on the ``uint8`` tensor, so nothing more is dequantized."""
    import onnx

    graph = model.graph
    shapes = {info.name: info for info in onnx.shape_inference.infer_shapes(model).graph.value_info}
    shapes.update({info.name: info for info in graph.input})
    tensors = {t.name: t for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    rewritten = False
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        source, weights = producers.get(conv.input[0]), producers.get(conv.input[1])
        if source is None or weights is None or {source.op_type, weights.op_type} != {"DequantizeLinear"}:
            continue
        kernel = tensors.get(weights.input[0])
        plan = _stem_plan(conv, kernel, _spatial_size(shapes.get(conv.input[0])), max_channels)
        if plan is None:
            continue
        _to_space_to_depth(graph, conv, source, kernel, plan)
        rewritten = True
    return rewritten


def gemm_patch(model: Any, min_inputs: int = GEMM_MIN_INPUTS) -> str:
    """Base64 of a ModelProto holding only graph inputs: one per weight zero point of the
    convolutions with at least ``min_inputs`` inputs per output. Appended to the serialized graph,
    protobuf merges it in (a repeated field's entries are concatenated), and those zero points
    become overridable initializers, which ONNX Runtime does not treat as constants: it then runs
    those convolutions through its general INT8 GEMM instead of its symmetric kernels."""
    import onnx
    from onnx import helper

    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    consumers = {name: node for node in graph.node for name in node.input}
    inputs = {}
    for node in graph.node:
        weights = tensors.get(node.input[0]) if node.op_type == "DequantizeLinear" and len(node.input) == 3 else None
        consumer = consumers.get(node.output[0])
        if weights is None or len(weights.dims) != 4 or consumer is None or consumer.op_type != "Conv":
            continue
        if consumer.input[1] == node.output[0] and int(np.prod(weights.dims[1:])) >= min_inputs:
            zero = tensors[node.input[2]]
            inputs[zero.name] = helper.make_tensor_value_info(zero.name, zero.data_type, list(zero.dims))
    patch = onnx.ModelProto(graph=onnx.GraphProto(input=list(inputs.values())))
    return base64.b64encode(patch.SerializeToString()).decode()


def _to_space_to_depth(graph: Any, conv: Any, source: Any, kernel: Any, plan: tuple[int, int, int, int]) -> None:
    """``stem_to_space_to_depth`` for one convolution, ``source`` the dequantization of its input."""
    from onnx import helper, numpy_helper

    shift, blocks, before, after = plan
    w = numpy_helper.to_array(kernel)
    out_channels, channels, k = w.shape[0], w.shape[1], w.shape[2]
    padded = np.zeros((out_channels, channels, 2 * blocks, 2 * blocks), w.dtype)
    padded[:, :, shift:shift + k, shift:shift + k] = w
    cut = padded.reshape(out_channels, channels, blocks, 2, blocks, 2).transpose(0, 3, 5, 1, 2, 4)
    kernel.CopyFrom(numpy_helper.from_array(
        np.ascontiguousarray(cut.reshape(out_channels, 4 * channels, blocks, blocks)), kernel.name))
    blocked = f"{source.input[0]}_space_to_depth"
    nodes = [helper.make_node("SpaceToDepth", [source.input[0]], [blocked], blocksize=2,
                              name=f"{conv.name}_space_to_depth"),
             helper.make_node("DequantizeLinear", [blocked, *source.input[1:]], [f"{blocked}_dequantized"],
                              name=f"{conv.name}_space_to_depth_dequantized")]
    position = list(graph.node).index(conv)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    conv.input[0] = nodes[-1].output[0]
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [blocks, blocks]),
                           helper.make_attribute("strides", [1, 1]),
                           helper.make_attribute("pads", [before, before, after, after])])
    if not any(source.output[0] in node.input for node in graph.node):
        graph.node.remove(source)


def _spatial_size(info: Any) -> tuple[int, int] | None:
    """Height and width of an NCHW tensor's value info, where both are fixed numbers."""
    dims = info.type.tensor_type.shape.dim if info is not None else []
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[2:]):
        return None
    return dims[2].dim_value, dims[3].dim_value


def _stem_plan(conv: Any, kernel: Any, size: tuple[int, int] | None,
               max_channels: int) -> tuple[int, int, int, int] | None:
    """For a convolution that ``stem_to_space_to_depth`` can rewrite: where its kernel starts
    in the blocks (0 or 1, as its padding is even or odd), the blocks it spans, and the padding
    before and after, in blocks. None for any other convolution."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if kernel is None or size is None or len(kernel.dims) != 4 or kernel.dims[1] > max_channels:
        return None
    k, pads = kernel.dims[2], list(attributes.get("pads", [0, 0, 0, 0]))
    if (kernel.dims[3] != k or list(attributes.get("strides", [1, 1])) != [2, 2] or attributes.get("group", 1) != 1
            or any(d != 1 for d in attributes.get("dilations", [1, 1])) or len(set(pads)) != 1
            or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or size[0] % 2 or size[1] % 2):
        return None
    p = pads[0]
    shift = p % 2
    blocks, before = (k + shift + 1) // 2, (p + shift) // 2
    after = (2 * p - k) // 2 + 1 - before + blocks - 1  # output rows (H + 2p - k) // 2 + 1, less the H / 2 blocks
    return (shift, blocks, before, after) if after >= 0 else None


def _head(graph: Any) -> list[str]:
    """The softmax and the layer that feeds it (the classifier): they stay float, so the logits
    keep their precision and the probabilities sum to 1; they are a sliver of the work."""
    producers = {output: node for node in graph.node for output in node.output}
    softmax = [node for node in graph.node if node.op_type == "Softmax"]
    return [node.name for node in softmax] + [producers[n.input[0]].name for n in softmax if n.input[0] in producers]
