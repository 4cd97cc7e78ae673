"""OpenVINO as a backend: the repository's ONNX artefacts (FP32, or INT8 as static QDQ) on the CPU,
for CPUs where ONNX Runtime's INT8 kernels fall behind (``pip install 'resnet-serve[openvino]'``).

Why a third runtime: on an Intel Xeon with AMX, ONNX Runtime's INT8 convolutions run on its VNNI
kernels and reach half to two thirds of TorchScript's x86 INT8 speed at batch 4 and 8, while
OpenVINO's CPU plugin (oneDNN, AMX where present) runs the same QDQ graph faster than TorchScript
and without torch (``benchmarks/engine_bench.py``, ``benchmarks/memory_bench.py``; docs/performance.md). It
costs memory: a server of the INT8 ResNet-18 idles 40–60 MB above ONNX Runtime's
(``benchmarks/memory_bench.py``), so the slim install stays ONNX Runtime alone. It reads the
ONNX file itself: no export step, no format of its own in the repository.

Serving settings: its own threads (``RESNET_SERVE_OPENVINO_THREADS``), one stream per instance
(``RESNET_SERVE_INSTANCES``: batches run at once, one per inference thread) and the latency hint,
threads not pinned to cores (the cores
are shared with the decode threads and the event loop), and FP32 arithmetic wherever the graph is
FP32 (OpenVINO's default on CPUs with BF16 units is BF16, which would change the answers) unless
BF16 is asked for (``RESNET_SERVE_PRECISION=bf16``): then the FP32 graph runs in BF16, on the
Xeon with AMX we measured 4–5 times as fast as FP32 with the same Top-1 (docs/performance.md). OpenVINO itself
decides whether this CPU can: without AVX-512 it runs FP32, and the backend then says so; with
AVX-512 but no BF16 units it takes BF16 all the same, and the backend warns. The
batch dimension stays dynamic, as exported, and the compiled model is kept by OpenVINO's own
cache (``CACHE_DIR``) under the compiled-model cache, so a restart skips compiling. The model is
compiled from its path, not from a model read first: with a kept compiled model OpenVINO then never
reads or parses the ONNX file.
The first call at each batch size prepares that shape (on a Xeon, 24–31 ms more than later calls
for INT8, 23–41 for FP32: ``benchmarks/engine_bench.py``), so warm-up runs every size once. One
infer request per inference thread, made by ``prepare_thread`` and used by that thread only; its
output buffer is reused by the next batch, so ``run`` returns a copy.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import openvino

from resnet_serve.backends import GRAPH_INPUT, GRAPH_OUTPUT, OPENVINO, cpu_flags

logger = logging.getLogger(__name__)

RUNTIME_VERSION: str = openvino.__version__.split("-")[0]  # keys the compiled-model cache with the CPU


class OpenVinoBackend:
    """An OpenVINO compiled model on the CPU."""

    runtime = OPENVINO
    device = "cpu"
    warmup_rounds = 1
    warmup_every_size = True  # a batch size's first call prepares its shape (see above)

    def __init__(self, path: Path, *, threads: int, precision: str = "fp32", cache: Path | None = None,
                 instances: int = 1) -> None:
        """``precision``: the artefact's (fp32, int8), or bf16 to run an FP32 graph in BF16.
        ``cache``: the folder where OpenVINO keeps the compiled model between starts (None: not kept).
        ``instances``: threads that call ``run`` at once, a stream each, sharing ``threads``."""
        core = openvino.Core()
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        self.compiled = core.compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": instances,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        })
        self.precision = precision if precision != "bf16" else self._bf16_granted()
        self.instances = instances
        self._local = threading.local()

    def _bf16_granted(self) -> str:
        """bf16 where OpenVINO runs it, else fp32 (what it runs instead on a CPU without AVX-512)."""
        if self.compiled.get_property("INFERENCE_PRECISION_HINT") != openvino.Type.bf16:
            logger.warning("OpenVINO runs no BF16 on this CPU (it needs AVX-512); serving the model in FP32")
            return "fp32"
        if not {"avx512_bf16", "amx_bf16", "avx_ne_convert"} & cpu_flags():
            logger.warning("this CPU has no BF16 units (AVX512-BF16, AMX or AVX-NE-CONVERT): "
                           "OpenVINO's BF16 is likely slow here")
        return "bf16"

    def prepare_thread(self) -> None:
        """This thread's infer request (OpenVINO keeps its own threads)."""
        self._local.request = self.compiled.create_infer_request()

    def run(self, pixels: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:  # a caller that is no inference thread (a benchmark, a test)
            self.prepare_thread()
            request = self._local.request
        request.infer({GRAPH_INPUT: np.ascontiguousarray(pixels)})
        return np.array(request.get_tensor(GRAPH_OUTPUT).data, copy=True)
