"""ONNX export, and ONNX Runtime as an alternative CPU runtime (the ``onnx`` extra).

The exported graph is the same ``Classifier`` the TorchScript engine traces: ``uint8`` NCHW
pixels in, float32 probabilities out, with a dynamic batch dimension. ``OrtModel`` makes an
ONNX Runtime session look like a torch module to the inference thread.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from resnet_serve.weights import LoadedWeights, ModelSpec

OPSET = 17


def export_onnx(spec: ModelSpec, weights: LoadedWeights, path: Path) -> Path:
    """Write the FP32 classifier as ONNX (needs the ``onnx`` package)."""
    from resnet_serve.engine import Classifier

    net = spec.build_module()
    net.load_state_dict(weights.state_dict)
    model = Classifier(net.eval(), spec, torch.float32, channels_last=False).eval()
    example = torch.zeros(1, 3, spec.crop_size, spec.crop_size, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=["pixels"], output_names=["probs"],
            dynamic_axes={"pixels": {0: "batch"}, "probs": {0: "batch"}},
        )
    return path


class OrtModel:
    """An ONNX Runtime session called like the TorchScript module (tensor in, tensor out)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (probs,) = self.session.run(["probs"], {"pixels": np.ascontiguousarray(pixels.numpy())})
        return torch.from_numpy(probs)
