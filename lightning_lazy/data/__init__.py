"""Data of the paper's experiments: CIFAR-10 (torchvision) and teacher–student data on the sphere."""

from lightning_lazy.data.cifar10 import (
    CIFAR10DataModule,
    CIFAR10NotFoundError,
    DeviceTensorLoader,
    SyntheticCIFAR10DataModule,
)
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
    "SyntheticCIFAR10DataModule",
    "Teacher",
    "TeacherStudentDataModule",
    "make_teacher_dataset",
    "sample_sphere",
]
