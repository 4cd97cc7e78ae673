"""ONNX export of the serving graph (the ``onnx`` package, in the ``torch`` extra), and its
static INT8 quantization with ONNX Runtime's quantizer, and the patch that sends the INT8
graph's large convolutions through ONNX Runtime's INT8 GEMM on CPUs with AMX
(``backends.onnxruntime``).

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
    return {"int8_backend": ORT_INT8_SCHEME, "ort_gemm_patch": gemm_patch(onnx.load(str(path)))}


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


def _head(graph: Any) -> list[str]:
    """The softmax and the layer that feeds it (the classifier): they stay float, so the logits
    keep their precision and the probabilities sum to 1; they are a sliver of the work."""
    producers = {output: node for node in graph.node for output in node.output}
    softmax = [node for node in graph.node if node.op_type == "Softmax"]
    return [node.name for node in softmax] + [producers[n.input[0]].name for n in softmax if n.input[0] in producers]
