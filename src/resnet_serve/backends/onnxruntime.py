"""ONNX Runtime as a backend (the ``onnx`` extra): CPU, FP32.

The graph is the same serving graph the TorchScript backend runs (exported by
``backends.torch.onnx_export``): ``uint8`` NCHW pixels in, float32 probabilities out, with a
dynamic batch dimension. Its threads are its own (``RESNET_SERVE_ORT_THREADS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from resnet_serve.backends import GRAPH_INPUT, GRAPH_OUTPUT, ONNXRUNTIME


class OnnxRuntimeBackend:
    """An ONNX Runtime session on the CPU."""

    runtime = ONNXRUNTIME
    device = "cpu"

    def __init__(self, path: Path, *, threads: int, precision: str = "fp32") -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.precision = precision
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def prepare_thread(self) -> None:
        """ONNX Runtime keeps its own thread pool; nothing to set per thread."""

    def run(self, pixels: np.ndarray) -> np.ndarray:
        (probs,) = self.session.run([GRAPH_OUTPUT], {GRAPH_INPUT: np.ascontiguousarray(pixels)})
        return probs
