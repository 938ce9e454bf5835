"""A small Vision Transformer for 32x32 images (CIFAR-10).

The architecture of Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", ICLR 2021 (arXiv 2010.11929), built from torchvision's
``VisionTransformer`` at CIFAR scale: 4x4 patches (an 8x8 patch grid and one class token, 65
tokens), width 192 and 3 heads as ViT-Ti (DeiT, Touvron et al. 2021), 6 encoder blocks with an
MLP of width 384. It is the ``vit-cpu`` accuracy preset's model (``bench.accuracy``); it is
not a published CIFAR recipe.
"""
from __future__ import annotations

from torch import nn

__all__ = ["vit_cifar"]


def vit_cifar(num_classes: int = 10, image_size: int = 32, patch_size: int = 4, dim: int = 192,
              depth: int = 6, heads: int = 3, mlp_dim: int = 384) -> nn.Module:
    """torchvision ``VisionTransformer`` for (N, 3, image_size, image_size) -> (N, num_classes).

    Args:
        num_classes: classes of the classifier.
        image_size: side of the (square) input image, a multiple of ``patch_size``.
        patch_size: side of a patch (the patchify convolution's kernel and stride).
        dim: token width D; ``heads`` must divide it.
        depth: number of encoder blocks (the cut points lie between them).
        heads: attention heads.
        mlp_dim: hidden width of each block's MLP.

    Raises:
        ValueError: ``image_size`` not a multiple of ``patch_size`` or ``dim`` not a multiple
            of ``heads``.
    """
    from torchvision.models import VisionTransformer

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    if dim % heads:
        raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=depth, num_heads=heads,
                             hidden_dim=dim, mlp_dim=mlp_dim, num_classes=num_classes)
