"""The seam between the service and whatever runs the network: a ``Backend`` speaks numpy.

Nothing above this seam imports a runtime. Each runtime lives in its own module and imports its
own library: ``backends.onnxruntime`` (ONNX Runtime), ``backends.openvino`` (OpenVINO, which
serves the same ONNX artefacts) and ``backends.torch`` (TorchScript, plus everything that needs
torch to build a model: weights, graph, quantization, export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

TORCHSCRIPT, ONNXRUNTIME, OPENVINO = "torchscript", "onnxruntime", "openvino"
# Triton's platform names, which the Open Inference Protocol's model metadata reports.
PLATFORMS = {TORCHSCRIPT: "pytorch_torchscript", ONNXRUNTIME: "onnxruntime_onnx", OPENVINO: "openvino"}
# The serving graph's tensor names, whatever format it is saved in.
GRAPH_INPUT, GRAPH_OUTPUT = "pixels", "probs"
# ONNX graphs of models with a global-pool + linear head also output the last block's
# activations, which CAM explanations read without torch (serving asks for ``probs`` only).
GRAPH_FEATURES = "features"
# Bump when the serving graph changes what it computes: default models are exported again.
GRAPH_VERSION = "2"
# How ONNX artefacts are quantized to INT8 (backends.torch.onnx_export.quantize_onnx).
ORT_INT8_SCHEME = "ort-qdq-u8s8-reduced"


class Backend(Protocol):
    """A loaded network: ``uint8 [N, 3, H, W]`` pixels in, ``float32 [N, classes]`` probabilities
    out. Called from one thread only (the inference thread), so it needs no lock."""

    runtime: str  # TORCHSCRIPT, ONNXRUNTIME or OPENVINO
    device: str
    precision: str
    warmup_rounds: int  # calls per batch size before the runtime has settled (TorchScript profiles)
    warmup_every_size: bool  # False: batch 1 only (see Engine.warmup)

    def prepare_thread(self) -> None:
        """Per-thread set-up, run once on the inference thread before the first batch."""

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for one batch."""


@dataclass(frozen=True)
class Explained:
    """One image explained: its probabilities and, per class, a map over the model's crop at the
    explained layer's resolution (``[h, w]`` in ``[0, 1]``), and how it was made."""

    probs: np.ndarray
    grids: dict[int, np.ndarray]
    layer: str
    method: str  # "grad-cam" (backends.torch.gradcam) or "cam" (backends.onnxruntime.OnnxCam)
