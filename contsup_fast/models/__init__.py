"""Backbones: CIFAR ResNets, and torchvision or timm classification models by name."""
from __future__ import annotations

from torch import nn

from .cifar_resnet import BasicBlock, CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .vit_cifar import vit_cifar

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "vit_cifar", "CIFAR_MODELS", "TIMM_PREFIX", "build_model"]

CIFAR_MODELS = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44,
                "resnet56": resnet56, "resnet110": resnet110, "vit_cifar": vit_cifar}


TIMM_PREFIX = "timm:"


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a backbone by name, with freshly initialised weights (nothing is downloaded).

    ``name`` is one of:

    * a CIFAR ResNet: ``resnet20/32/44/56/110`` (:mod:`contsup_fast.models.cifar_resnet`);
    * the CIFAR ViT ``vit_cifar`` (:mod:`contsup_fast.models.vit_cifar`);
    * a ``torchvision.models`` classification model (``resnet18``, ``wide_resnet50_2``,
      ``vgg11_bn``...), built with ``weights=None``;
    * ``"timm:<model>"``: a timm model (``timm:resnet18``, ``timm:convnext_atto``...), built
      with ``timm.create_model(<model>, pretrained=False, num_classes=num_classes)``; needs
      the optional extra ``pip install "contsup_fast[timm]"``.

    Args:
        name: the model name as above.
        num_classes: size of the classifier's output (logits of shape (N, num_classes)).

    Raises:
        ValueError: ``name`` is none of the above, ``timm:`` is given but timm is not installed
            or does not know the model, or torchvision is needed and not installed.
    """
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes)
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX):], num_classes)
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - torchvision is a dev dependency
        raise ValueError(f"model {name!r} needs torchvision, which is not installed") from exc
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"model must be one of {sorted(CIFAR_MODELS)}, a torchvision classification "
                         f"model ({', '.join(sorted(available)[:8])}, ...) or 'timm:<name>', got {name!r}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _build_timm(name: str, num_classes: int) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes)``, or a ValueError."""
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"model 'timm:{name}' needs timm, which is not installed; install it with "
                         f"pip install \"contsup_fast[timm]\" (or pip install timm)") from exc
    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:6] if name else []
        hint = f" (close names: {', '.join(close)})" if close else ""
        raise ValueError(f"model 'timm:{name}': timm {timm.__version__} has no model named {name!r}"
                         f"{hint}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)
