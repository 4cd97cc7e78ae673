"""The seam between the service and whatever runs the network: a ``Backend`` speaks numpy.

Nothing above this seam imports a runtime. Each runtime lives in its own module and imports its
own library: ``backends.onnxruntime`` (ONNX Runtime), ``backends.openvino`` (OpenVINO, which
serves the same ONNX artefacts) and ``backends.torch`` (TorchScript, plus everything that needs
torch to build a model: weights, graph, quantization, export).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
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
# How ONNX artefacts are quantized to INT8 (backends.torch.onnx_export.quantize_onnx), with the
# graph patch that sends their large convolutions through ONNX Runtime's INT8 GEMM on AMX CPUs.
ORT_INT8_SCHEME = "ort-qdq-u8s8-reduced+gemm-patch"


class Backend(Protocol):
    """A loaded network: ``uint8 [N, 3, H, W]`` pixels in, ``float32 [N, classes]`` probabilities
    out. Called from its inference threads only, one per instance: each runtime's session runs
    several calls at once safely (ONNX Runtime, TorchScript) or keeps one request per thread
    (OpenVINO), so it needs no lock."""

    runtime: str  # TORCHSCRIPT, ONNXRUNTIME or OPENVINO
    device: str
    precision: str
    warmup_rounds: int  # calls per batch size before the runtime has settled (TorchScript profiles)
    warmup_every_size: bool  # False: batch 1 only (see Engine.warmup)
    instances: int  # threads that call run() at once (RESNET_SERVE_INSTANCES), each its own batch

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


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's model name: the runtime choice and ONNX Runtime's optimised graph depend on it."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux names them (``avx512_vnni``, ``amx_int8``...);
    empty where the kernel does not say. A virtual machine may report a generic model name, so
    what was compiled for one CPU is keyed by these as well."""
    return frozenset(_cpuinfo().get("flags", "").split())


# Linux gives a process AMX state only when it asks: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1022, 0x1023, 18


@functools.cache
def amx_usable() -> bool:
    """Whether this process can run AMX tiles: the CPU has them and the kernel grants their state
    (Linux 5.16 on, and no seccomp rule against it). ONNX Runtime asks the same way and, refused,
    runs its AVX-512 kernels, where the GEMM patch would be slower."""
    if "amx_int8" not in cpu_flags() or sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL(None).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0)
    return False
