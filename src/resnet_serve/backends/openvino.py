"""OpenVINO as a backend: the repository's ONNX artefacts (FP32, or INT8 as static QDQ) on the CPU,
for CPUs where ONNX Runtime's INT8 kernels fall behind (``pip install 'resnet-serve[openvino]'``).

Why a third runtime: on an Intel Xeon with AMX, ONNX Runtime's INT8 convolutions run on its VNNI
kernels and reach half to two thirds of TorchScript's x86 INT8 speed at batch 4 and 8, while
OpenVINO's CPU plugin (oneDNN, AMX where present) runs the same QDQ graph faster than TorchScript
and without torch (``benchmarks/engine_bench.py``, ``benchmarks/memory_bench.py``; README). It
costs memory: a server of the INT8 ResNet-18 idles 40–60 MB above ONNX Runtime's
(``benchmarks/memory_bench.py``), so the slim install stays ONNX Runtime alone. It reads the
ONNX file itself: no export step, no format of its own in the repository.

Serving settings: its own threads (``RESNET_SERVE_OPENVINO_THREADS``), one stream and the latency
hint (batches run one at a time on the inference thread), threads not pinned to cores (the cores
are shared with the decode threads and the event loop), and FP32 arithmetic wherever the graph is
FP32 (OpenVINO's default on CPUs with BF16 units is BF16, which would change the answers). The
batch dimension stays dynamic, as exported, and the compiled model is kept by OpenVINO's own
cache (``CACHE_DIR``) under the compiled-model cache, so a restart skips compiling. The model is
compiled from its path, not from a model read first: with a kept compiled model OpenVINO then never
reads or parses the ONNX file.
The first call at each batch size prepares that shape (on a Xeon, 24–31 ms more than later calls
for INT8, 23–41 for FP32: ``benchmarks/engine_bench.py``), so warm-up runs every size once. One
infer request, used by the inference thread only; its output buffer is reused by the next batch,
so ``run`` returns a copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino

from resnet_serve.backends import GRAPH_INPUT, GRAPH_OUTPUT, OPENVINO

RUNTIME_VERSION: str = openvino.__version__.split("-")[0]  # keys the compiled-model cache with the CPU


class OpenVinoBackend:
    """An OpenVINO compiled model on the CPU."""

    runtime = OPENVINO
    device = "cpu"
    warmup_rounds = 1
    warmup_every_size = True  # a batch size's first call prepares its shape (see above)

    def __init__(self, path: Path, *, threads: int, precision: str = "fp32", cache: Path | None = None) -> None:
        """``cache``: the folder where OpenVINO keeps the compiled model between starts (None: not kept)."""
        self.precision = precision
        core = openvino.Core()
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        self.compiled = core.compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "f32",
        })
        self.request = self.compiled.create_infer_request()

    def prepare_thread(self) -> None:
        """OpenVINO keeps its own threads; nothing to set per thread."""

    def run(self, pixels: np.ndarray) -> np.ndarray:
        self.request.infer({GRAPH_INPUT: np.ascontiguousarray(pixels)})
        return np.array(self.request.get_tensor(GRAPH_OUTPUT).data, copy=True)
