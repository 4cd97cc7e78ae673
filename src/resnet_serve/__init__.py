"""resnet-serve: ImageNet classification with ResNet-18 over HTTP, dynamically batched."""

__version__ = "0.1.0"
