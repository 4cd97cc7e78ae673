"""The TorchScript backend: a compiled serving graph on CUDA, Apple MPS or the CPU.

It needs torch only (no torchvision): the graph was traced and frozen beforehand
(``backends.torch.compile``), with normalisation and softmax inside it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from resnet_serve.backends import TORCHSCRIPT

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16", "int8"]


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit name must be available."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise RuntimeError(f"RESNET_SERVE_DEVICE={name} but no {name} device is available")
    return torch.device(name)


def select_precision(name: str, device: torch.device) -> Precision:
    """``auto`` is FP16 on CUDA (tensor cores), FP32 elsewhere."""
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise RuntimeError("RESNET_SERVE_PRECISION=fp16 needs a CUDA or MPS device")
    if name == "int8" and device.type != "cpu":
        raise RuntimeError("RESNET_SERVE_PRECISION=int8 runs on the CPU only; use fp16 on a GPU")
    if name == "bf16" and device.type == "cpu" and not cpu_has_bf16_kernels():
        logger.warning("oneDNN has no bf16 kernels for this CPU (they need AVX-512); bf16 will be slow here")
    return name  # type: ignore[return-value]


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU: AVX-512 emulates bf16 arithmetic, and
    AVX512-BF16 or AMX run it natively (faster than fp32); without them torch's reference
    kernels run, far slower than fp32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


@contextlib.contextmanager
def torchscript_quietly() -> Iterator[None]:
    """TorchScript is deprecated upstream in favour of torch.export; it is still the format
    this service ships (the design asks for it), so its notices are not news here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    with torchscript_quietly():
        return torch.jit.load(str(path), map_location=device)


class TorchScriptBackend:
    """A TorchScript module (or any module with the same contract) on one device."""

    runtime = TORCHSCRIPT
    warmup_rounds = 3  # the profiling executor optimises the graph over its first calls
    warmup_every_size = True

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device, precision: str,
                 threads: int, instances: int = 1) -> None:
        """``instances``: threads that call ``run`` at once (a frozen graph runs safely from several),
        each with its share of ``threads``."""
        self.model = model
        self.device = str(device)
        self.precision = precision
        self.instances = instances
        self._device = device
        self._threads = max(1, threads // instances)

    @classmethod
    def load(cls, path: Path, *, device_name: str, precision: str, threads: int,
             int8_backend: str | None = None, instances: int = 1) -> TorchScriptBackend:
        """A saved serving graph on the configured device (INT8: on the CPU, with the quantized
        kernels it was built for)."""
        device = select_device(device_name)
        select_precision(precision, device)  # refuses what this device cannot run
        if precision == "int8":
            torch.backends.quantized.engine = int8_backend or "x86"
        torch.set_num_threads(threads)
        return cls(load_torchscript(path, device), device=device, precision=precision, threads=threads,
                   instances=instances)

    def prepare_thread(self) -> None:
        """This thread's share of the intra-op threads (OpenMP keeps the count per thread)."""
        torch.set_num_threads(self._threads)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(self._device, non_blocking=True)
            return self.model(batch).cpu().numpy()
