"""Auxiliary heads: the small networks that turn a local module's output into its local loss.

Configurations ``<a>c<b>f`` (InfoPro, Wang et al. ICLR 2021; ContSup, arXiv 2312.07636,
Sec. 4.1): ``a`` convolutions then ``b`` fully connected layers. For an input of C channels,
the first convolution is Conv3x3(C->2C, stride 2, no bias), or Conv3x3(C->C, stride 1) at the
widest stage (C equal to the widest boundary of the network); a second convolution (``2c``)
keeps the width. Each convolution is followed by BN -> ReLU; then global average pooling and
the MLP ``Linear(width->feature_dim) -> ReLU -> ... -> Linear(->out)``. ``0c1f`` is a linear
probe on pooled features. The final BN -> ReLU -> global average pool (or the plain pool of
``0c*``) runs through the backend's fused op.
"""
from __future__ import annotations

from typing import List

import torch.nn.functional as F
from torch import Tensor, nn

from .fused.reference import update_running_stats

__all__ = ["AUX_CONFIGS", "AuxiliaryHead"]

AUX_CONFIGS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")


class AuxiliaryHead(nn.Module):
    """Auxiliary head ``config`` for a (N, C, H, W) feature map; output (N, out_features).

    Args:
        in_channels: C.
        config: one of :data:`AUX_CONFIGS`.
        out_features: classes (cross-entropy) or the embedding size (supervised contrastive).
        widest: True at the widest stage: convolutions keep C channels and stride 1.
        feature_dim: hidden width of the MLP (128 in the paper).

    Raises:
        ValueError: unknown ``config``.
    """

    def __init__(self, in_channels: int, config: str = "1c2f", out_features: int = 10,
                 widest: bool = False, feature_dim: int = 128):
        super().__init__()
        if config not in AUX_CONFIGS:
            raise ValueError(f"aux must be one of {AUX_CONFIGS}, got {config!r}")
        self.config = config
        n_conv, n_fc = int(config[0]), int(config[2])
        width = in_channels if (widest or n_conv == 0) else 2 * in_channels
        convs: List[nn.Module] = []
        for i in range(n_conv):
            stride = 1 if (widest or i > 0) else 2
            if i > 0:
                convs += [nn.BatchNorm2d(width), nn.ReLU()]
            convs.append(nn.Conv2d(in_channels if i == 0 else width, width, 3, stride=stride,
                                   padding=1, bias=False))
        self.convs = nn.Sequential(*convs)
        self.norm = nn.BatchNorm2d(width) if n_conv else None
        dims = [width] + [feature_dim] * (n_fc - 1) + [out_features]
        mlp: List[nn.Module] = []
        for i in range(n_fc):
            if i > 0:
                mlp.append(nn.ReLU())
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
        self.mlp = nn.Sequential(*mlp)

    def pool(self, h: Tensor, backend) -> Tensor:
        """Convolutions, then (BN -> ReLU ->) global average pool: (N, C, H, W) -> (N, width)."""
        z = self.convs(h)
        if self.norm is None:
            return backend.global_avg_pool(z)
        if backend.name == "torch":
            return F.relu(self.norm(z)).mean(dim=(2, 3))
        bn = self.norm
        pooled, mean, var = backend.bn_relu_gap(z, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                bn.training, bn.eps)
        update_running_stats(bn, mean, var, z.shape[0] * z.shape[2] * z.shape[3])
        return pooled

    def forward(self, h: Tensor, backend) -> Tensor:
        return self.mlp(self.pool(h, backend))
