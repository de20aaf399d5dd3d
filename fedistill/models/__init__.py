"""Model registry: ConvNet (the DD standard), MLP, LeNet, ResNet-18."""

from fedistill.models import convnet, resnet, simple  # noqa: F401  (registration)
from fedistill.models.convnet import ConvNet
from fedistill.models.registry import MODELS, build_model, register_model, reinitialize

__all__ = ["MODELS", "ConvNet", "build_model", "register_model", "reinitialize"]
