"""Networks of the paper's experiments: CIFAR VGG-11 and ResNet-18 (width factor), two-layer ReLU nets, the
MNIST-1D CNN (width factor), and the MNIST-1D benchmark's other baselines (logistic regression, MLP, GRU)."""

from lightning_lazy.models.cnn1d import CNN1D
from lightning_lazy.models.init import xavier_normal_init
from lightning_lazy.models.mnist1d import GRU1D, MLP1D, Logistic1D
from lightning_lazy.models.resnet import ResNet18
from lightning_lazy.models.shallow import TwoLayerReLU
from lightning_lazy.models.vgg import VGG11

__all__ = ["CNN1D", "GRU1D", "Logistic1D", "MLP1D", "ResNet18", "TwoLayerReLU", "VGG11", "xavier_normal_init"]
