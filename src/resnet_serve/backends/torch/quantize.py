"""Static post-training INT8 quantization of the network for x86 CPUs.

FX graph mode (``prepare_fx`` → calibrate → ``convert_fx``) with PyTorch's default qconfig for
the chosen backend (``fbgemm``, ``onednn`` or ``x86``), calibrated on real photos (``photos``)
put through the same pre-processing the service uses.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from resnet_serve.spec import ModelSpec


def quantize_network(net: nn.Module, spec: ModelSpec, calibration: np.ndarray, backend: str) -> nn.Module:
    """An INT8 copy of ``net`` (float in, float out), calibrated on ``calibration`` (uint8 NCHW)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    example = (torch.zeros(1, 3, spec.crop_size, spec.crop_size),)
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the API works as documented.
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, message=r".*(torch\.ao|torchao|quantiz).*")
            warnings.filterwarnings("ignore", category=category, module=r"torch\.ao")
        prepared = prepare_fx(copy.deepcopy(net).eval(), get_default_qconfig_mapping(backend), example)
        with torch.no_grad():
            for batch in torch.from_numpy(calibration).split(16):
                prepared((batch.float() / 255.0 - mean) / std)
        return convert_fx(prepared).eval()
