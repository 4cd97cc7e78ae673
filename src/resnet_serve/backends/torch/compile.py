"""Building the TorchScript serving graph from weights, and the on-disk cache of built graphs.

``compile_model`` builds the torchvision network, loads the weights, (quantizes,) wraps it in
the serving graph, traces and freezes it. ``load_or_compile`` keeps the result on disk under a
name that changes whenever the graph would, so a restart loads it instead of building it again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from resnet_serve.backends.torch.checkpoints import LoadedWeights
from resnet_serve.backends.torch.graph import DTYPES, ServingNetwork, build_network
from resnet_serve.backends.torch.quantize import (
    calibration_files,
    calibration_fingerprint,
    load_calibration_batch,
    quantize_network,
)
from resnet_serve.backends.torch.runtime import (
    Precision,
    load_torchscript,
    select_device,
    select_precision,
    torchscript_quietly,
)
from resnet_serve.settings import Settings
from resnet_serve.spec import ModelSpec
from resnet_serve.weights import RANDOM_INIT_SEED, WeightsInfo

logger = logging.getLogger(__name__)

# Bump when ServingNetwork or compile_model change what they build: it invalidates cached artefacts.
GRAPH_VERSION = 1


@dataclass(frozen=True)
class CompileOptions:
    """Everything that decides what ``compile_model`` builds (and so the cache key)."""

    device: torch.device
    precision: Precision
    channels_last: bool
    int8_backend: str = "x86"
    calibration_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> CompileOptions:
        device = select_device(settings.device)
        precision = select_precision(settings.precision, device)
        return cls(
            device=device,
            precision=precision,
            channels_last=settings.channels_last and device.type in ("cpu", "cuda") and precision != "int8",
            int8_backend=settings.int8_backend,
            calibration_dir=settings.calibration_dir,
        )

    def cache_name(self, spec: ModelSpec, weights: WeightsInfo) -> str:
        """A file name that changes whenever the compiled model would."""
        parts = [
            f"graph{GRAPH_VERSION}", torch.__version__, torchvision.__version__, self.device.type,
            self.precision, f"cl{int(self.channels_last)}", weights.sha256 or f"random{RANDOM_INIT_SEED}",
        ]
        if self.precision == "int8":
            files = calibration_files(self.calibration_dir)
            parts += [self.int8_backend, calibration_fingerprint(files)]
        key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
        return f"{spec.name}-{self.precision}-{self.device.type}-{key}.pt"


def compile_model(spec: ModelSpec, weights: LoadedWeights, options: CompileOptions) -> torch.jit.ScriptModule:
    """Build, load, (quantize,) trace and freeze the serving graph on ``options.device``."""
    device, precision = options.device, options.precision
    net = build_network(spec)
    net.load_state_dict(weights.state_dict)
    dtype = DTYPES[precision]
    net = net.to(device=device, dtype=dtype).eval()
    if precision == "int8":
        calibration = load_calibration_batch(calibration_files(options.calibration_dir), spec)
        net = quantize_network(net, spec, calibration, options.int8_backend)
    if options.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ServingNetwork(net, spec, dtype, options.channels_last).to(device).eval()
    example = torch.zeros(1, 3, spec.crop_size, spec.crop_size, dtype=torch.uint8, device=device)
    with torch.no_grad(), torchscript_quietly():
        traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.freeze(traced)


def load_or_compile(
    spec: ModelSpec, weights: LoadedWeights, options: CompileOptions, cache: Path | None
) -> tuple[torch.jit.ScriptModule, str]:
    """The compiled model from ``cache`` if it is there, else compiled now (and cached)."""
    if options.precision == "int8":  # the quantized kernels both to build and to run
        torch.backends.quantized.engine = options.int8_backend
    if cache is not None and cache.is_file():
        try:
            return load_torchscript(cache, options.device), "cache"
        except Exception as exc:  # a stale or damaged artefact is rebuilt, not fatal
            logger.warning("ignoring unreadable compiled model %s: %s", cache, exc)
    model = compile_model(spec, weights, options)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".partial")
            with torchscript_quietly():
                torch.jit.save(model, str(partial))
            partial.replace(cache)
        except OSError as exc:
            logger.warning("could not cache the compiled model in %s: %s", cache, exc)
    return model, "compiled"
