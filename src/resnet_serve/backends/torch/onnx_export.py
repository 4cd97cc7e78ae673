"""ONNX export of the serving graph (needs the ``onnx`` package, in the ``onnx`` extra).

The exported graph is the one the TorchScript backend runs, in FP32: ``uint8`` NCHW pixels in,
float32 probabilities out, with a dynamic batch dimension.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from resnet_serve.backends import GRAPH_INPUT, GRAPH_OUTPUT
from resnet_serve.backends.torch.checkpoints import LoadedWeights
from resnet_serve.backends.torch.graph import ServingNetwork, build_network
from resnet_serve.spec import ModelSpec

OPSET = 17


def export_onnx(spec: ModelSpec, weights: LoadedWeights, path: Path) -> Path:
    """Write the FP32 serving graph as ONNX."""
    net = build_network(spec)
    net.load_state_dict(weights.state_dict)
    model = ServingNetwork(net.eval(), spec, torch.float32, channels_last=False).eval()
    example = torch.zeros(1, 3, spec.crop_size, spec.crop_size, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[GRAPH_INPUT], output_names=[GRAPH_OUTPUT],
            dynamic_axes={GRAPH_INPUT: {0: "batch"}, GRAPH_OUTPUT: {0: "batch"}},
        )
    return path
