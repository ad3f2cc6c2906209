"""Data of the paper's experiments: CIFAR-10 (torchvision), teacher–student data on the sphere, and MNIST-1D
(generated locally by the ``mnist1d`` package)."""

from lightning_lazy.data.cifar10 import (
    CIFAR10DataModule,
    CIFAR10NotFoundError,
    DeviceTensorLoader,
    SyntheticCIFAR10DataModule,
)
from lightning_lazy.data.mnist1d import MNIST1DDataModule, make_mnist1d
from lightning_lazy.data.teacher import (
    FreshTeacherSamples,
    Teacher,
    TeacherStudentDataModule,
    make_teacher_dataset,
    sample_sphere,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10NotFoundError",
    "DeviceTensorLoader",
    "FreshTeacherSamples",
    "MNIST1DDataModule",
    "SyntheticCIFAR10DataModule",
    "Teacher",
    "TeacherStudentDataModule",
    "make_mnist1d",
    "make_teacher_dataset",
    "sample_sphere",
]
