"""The serving graph: a torchvision classifier wrapped so that ``uint8`` pixels go in and
probabilities come out, with normalisation (and the dtype cast) done once per batch inside."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from resnet_serve.spec import ModelSpec

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
}


def build_network(spec: ModelSpec) -> nn.Module:
    """A fresh, randomly initialised network of the spec's architecture and class count."""
    return build_network_of(spec.architecture, spec.num_classes)


def build_network_of(architecture: str, num_classes: int) -> nn.Module:
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


class ServingNetwork(nn.Module):
    """uint8 NCHW pixels in, float32 probabilities out: normalisation and softmax in the graph."""

    def __init__(self, net: nn.Module, spec: ModelSpec, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.net = net
        self.dtype = dtype
        self.channels_last = channels_last
        scale = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", (torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0).to(dtype))
        self.register_buffer("inv_std", (1.0 / scale).to(dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(self.dtype) - self.mean) * self.inv_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.net(x).float(), dim=1)
