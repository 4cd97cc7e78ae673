"""Grad-CAM (Selvaraju et al., 2017) on an eager FP32 copy of a served network.

For a class ``c`` and the activations ``A`` of one convolutional block (``[K, h, w]``), the map is
``relu(sum_k alpha_k * A_k)`` with ``alpha_k`` the spatial mean of ``d logit_c / d A_k``: one
forward pass, then one backward pass per explained class. For a global-pool + linear head (ResNet,
most torchvision classifiers) this equals CAM, ``relu(sum_k W[c, k] * A_k)`` up to a constant.

It is about forty lines, so they are written here rather than taken from captum (which brings
matplotlib), pytorch-grad-cam (OpenCV, matplotlib, scikit-learn) or torchcam (matplotlib): the
serving image stays small and nothing here draws. Colouring and placing the map on the photo
happen in ``resnet_serve.heatmaps``, without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnet_serve.backends import Explained
from resnet_serve.backends.torch.graph import build_network
from resnet_serve.errors import RepositoryError
from resnet_serve.spec import ModelSpec


def find_layer(net: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The module to explain: ``name`` if given, else the last convolutional block, i.e. the last
    top-level child that holds a ``Conv2d`` (ResNet's ``layer4``, ``features`` of VGG, DenseNet,
    EfficientNet or MobileNet, Inception's ``Mixed_7c``): its output is the final feature map,
    after the block's normalisation and activation, which is what Grad-CAM wants."""
    modules = dict(net.named_modules())
    if name is not None:
        if name not in modules or name == "":
            close = [n for n in modules if n and n.split(".")[0] == name.split(".")[0]][:5]
            raise RepositoryError(f"the network has no module {name!r}" + (f" (it has {', '.join(close)}, ...)"
                                                                          if close else ""))
        return name, modules[name]
    blocks = [(n, m) for n, m in net.named_children()
              if isinstance(m, nn.Conv2d) or any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not blocks:
        raise RepositoryError("the network has no Conv2d layer to explain")
    return blocks[-1]


class GradCam:
    """An eager network, its normalisation (as the serving graph does it) and the layer explained.

    Not thread-safe: the explainer's one worker thread owns it (``resnet_serve.explain``)."""

    def __init__(self, net: nn.Module, spec: ModelSpec, layer: str | None = None) -> None:
        self.net = net.float().eval().requires_grad_(False)
        self.layer, self._module = find_layer(self.net, layer)
        self.spec = spec

    @classmethod
    def load(cls, path: Path, spec: ModelSpec, layer: str | None = None) -> GradCam:
        """The network of ``spec``'s architecture with the FP32 weights in ``path`` (a state_dict,
        read with ``weights_only``: nothing in the file runs)."""
        net = build_network(spec)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return cls(net, spec, layer)

    def __call__(self, pixels: np.ndarray, classes: list[int] | None = None, top_k: int = 1) -> Explained:
        """Explain ``classes`` (or the ``top_k`` most probable) for one ``uint8 [3, H, W]`` image."""
        captured: list[torch.Tensor] = []
        hook = self._module.register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            with torch.enable_grad():
                logits = self.net(normalised(pixels[np.newaxis], self.spec).requires_grad_(True))
                activations = captured[-1]
                probs = torch.softmax(logits.detach(), dim=1)[0]
                wanted = classes if classes is not None else probs.topk(top_k).indices.tolist()
                grids = {}
                for i, c in enumerate(wanted):
                    (grads,) = torch.autograd.grad(logits[0, c], activations, retain_graph=i < len(wanted) - 1)
                    weights = grads[0].mean(dim=(1, 2), keepdim=True)
                    grids[int(c)] = _peak_scaled(torch.relu((weights * activations[0].detach()).sum(0)))
        finally:
            hook.remove()
        return Explained(probs.numpy(), grids, self.layer, "grad-cam")


def normalised(pixels: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """``uint8 [N, 3, H, W]`` pixels as the network's float input, normalised as the serving graph
    does it (``graph.ServingNetwork``), but outside it: explanations need the logits."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
    return (torch.from_numpy(np.ascontiguousarray(pixels)).float() - mean) * inv_std


def _peak_scaled(cam: torch.Tensor) -> np.ndarray:
    """Scaled to ``[0, 1]`` by its peak (an all-zero map stays zero)."""
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).numpy().astype(np.float32)


def linear_head(net: nn.Module, spec: ModelSpec, pixels: np.ndarray, layer: str | None = None,
                chunk: int = 100) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W [classes, K], b [classes])`` if the logits are ``W · mean(A) + b`` of the layer's
    activations ``A`` (a global-average-pool + linear head: ResNet, EfficientNet, RegNet...), else
    None. Read from the Jacobian of the logits with respect to ``A`` on ``pixels``: it must be the
    same at every position of every photo. Then CAM, ``relu(W[c] · A)``, needs no autograd, and the
    torch-free install can explain (``backends.onnxruntime.OnnxCam``)."""
    _, module = find_layer(net, layer)
    leaves: list[torch.Tensor] = []

    def leaf(_m: nn.Module, _i: object, output: torch.Tensor) -> torch.Tensor:
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1]

    hook = module.register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            logits = net.float().eval()(normalised(pixels, spec))
            if not leaves or leaves[-1].dim() != 4 or logits.dim() != 2:
                return None
            activations, classes = leaves[-1], logits.shape[1]
            rows = []
            for start in range(0, classes, chunk):
                eye = torch.eye(classes)[start : start + chunk]
                (jacobian,) = torch.autograd.grad(logits, activations, eye[:, None, :].expand(-1, len(pixels), -1),
                                                  retain_graph=True, is_grads_batched=True)
                area = jacobian.shape[-1] * jacobian.shape[-2]
                weights = jacobian[:, 0, :, 0, 0] * area
                if not torch.allclose(jacobian * area, weights[:, None, :, None, None].expand_as(jacobian),
                                      atol=1e-6 * max(1.0, float(weights.abs().max()))):
                    return None
                rows.append(weights)
    except RuntimeError:  # an operation batched gradients cannot go through: not a plain linear head
        return None
    finally:
        hook.remove()
    w = torch.cat(rows).detach()
    b = (logits.detach() - activations.detach().mean(dim=(2, 3)) @ w.T).mean(0)
    return w.numpy().astype(np.float32), b.numpy().astype(np.float32)
