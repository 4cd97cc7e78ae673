"""Building the TorchScript serving graph from weights: build the torchvision network, load the
weights, (quantize,) wrap it in the serving graph, trace and freeze it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from resnet_serve.backends.torch.checkpoints import LoadedWeights
from resnet_serve.backends.torch.graph import DTYPES, ServingNetwork, build_network
from resnet_serve.backends.torch.quantize import quantize_network
from resnet_serve.backends.torch.runtime import Precision, torchscript_quietly
from resnet_serve.photos import calibration_files, load_pixels
from resnet_serve.spec import ModelSpec


@dataclass(frozen=True)
class CompileOptions:
    """Everything that decides what ``compile_model`` builds."""

    precision: Precision
    channels_last: bool
    int8_backend: str = "x86"
    calibration_dir: Path | None = None
    device: torch.device = torch.device("cpu")


def compile_model(spec: ModelSpec, weights: LoadedWeights, options: CompileOptions) -> torch.jit.ScriptModule:
    """Build, load, (quantize,) trace and freeze the serving graph on ``options.device``."""
    device, precision = options.device, options.precision
    net = build_network(spec)
    net.load_state_dict(weights.state_dict)
    dtype = DTYPES[precision]
    net = net.to(device=device, dtype=dtype).eval()
    if precision == "int8":
        torch.backends.quantized.engine = options.int8_backend
        calibration = load_pixels(calibration_files(options.calibration_dir), spec)
        net = quantize_network(net, spec, calibration, options.int8_backend)
    channels_last = options.channels_last and precision != "int8"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ServingNetwork(net, spec, dtype, channels_last).to(device).eval()
    example = torch.zeros(1, 3, spec.crop_size, spec.crop_size, dtype=torch.uint8, device=device)
    with torch.no_grad(), torchscript_quietly():
        traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.freeze(traced)
