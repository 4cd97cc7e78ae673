"""Everything that needs torch: the TorchScript backend (``runtime``), and what builds a model
from weights (``checkpoints``, ``graph``, ``quantize``, ``compile``, ``onnx_export``).

Only ``runtime`` is needed to serve a compiled TorchScript artefact; torchvision is imported
only where a network is built.
"""
