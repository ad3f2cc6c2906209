"""Data of the paper's experiments: CIFAR-10 (torchvision) and teacher–student data on the sphere."""

from lightning_lazy.data.cifar10 import (
    CIFAR10DataModule,
    CIFAR10NotFoundError,
    DeviceTensorLoader,
    SyntheticCIFAR10DataModule,
)

__all__ = ["CIFAR10DataModule", "CIFAR10NotFoundError", "DeviceTensorLoader", "SyntheticCIFAR10DataModule"]
