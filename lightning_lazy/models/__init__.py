"""Networks of the paper's experiments: CIFAR VGG-11 and ResNet-18 (width factor), two-layer ReLU nets."""

from lightning_lazy.models.init import xavier_normal_init
from lightning_lazy.models.resnet import ResNet18
from lightning_lazy.models.shallow import TwoLayerReLU
from lightning_lazy.models.vgg import VGG11

__all__ = ["ResNet18", "TwoLayerReLU", "VGG11", "xavier_normal_init"]
