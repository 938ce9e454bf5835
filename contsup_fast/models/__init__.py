"""Backbones: CIFAR ResNets, and torchvision classification models by name."""
from __future__ import annotations

from torch import nn

from .cifar_resnet import BasicBlock, CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .vit_cifar import vit_cifar

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "vit_cifar", "CIFAR_MODELS", "build_model"]

CIFAR_MODELS = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44,
                "resnet56": resnet56, "resnet110": resnet110, "vit_cifar": vit_cifar}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a backbone by name: a CIFAR ResNet (``resnet20/32/44/56/110``), the CIFAR ViT
    ``vit_cifar`` (:mod:`contsup_fast.models.vit_cifar`) or any
    ``torchvision.models`` classification model (``resnet18``, ``wide_resnet50_2``, ``vgg11_bn``...).

    Raises:
        ValueError: ``name`` is neither a CIFAR ResNet nor a torchvision classification model.
    """
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes)
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - torchvision is a dev dependency
        raise ValueError(f"model {name!r} needs torchvision, which is not installed") from exc
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"model must be one of {sorted(CIFAR_MODELS)} or a torchvision classification "
                         f"model ({', '.join(sorted(available)[:8])}, ...), got {name!r}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
