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

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .fused.reference import update_running_stats

__all__ = ["AUX_CONFIGS", "AUX_METHODS", "AuxiliaryHead", "DGLHead"]

AUX_CONFIGS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")
#: every accepted ``aux``: the ``<a>c<b>f`` heads, AugLocal (:mod:`contsup_fast.auglocal`), DGL.
AUX_METHODS = AUX_CONFIGS + ("auglocal", "dgl")


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


class DGLHead(nn.Module):
    """DGL auxiliary network "mlp-sr" (Belilovsky et al., "Decoupled Greedy Learning of CNNs",
    ICML 2020; reference github.com/eugenium/DGL, ``auxiliary_nets_study/models.py``,
    ``auxillary_classifier3`` with ``n_lin=3, mlp_layers=3``) for a (N, C, S, S') map:

    1. adaptive average pool to ceil(S/4) x ceil(S'/4);
    2. three times Conv1x1(C->C, no bias) -> BN -> ReLU;
    3. adaptive average pool to 2x2, flatten to 4C;
    4. three times Linear(4C->4C) -> BN1d -> ReLU;
    5. Linear(4C -> out_features).

    Args:
        in_channels: C.
        in_size: (S, S') spatial size of the module output.
        out_features: classes (cross-entropy) or the embedding size (supervised contrastive).
    """

    def __init__(self, in_channels: int, in_size, out_features: int = 10):
        super().__init__()
        self.pool_size = tuple(math.ceil(s / 4) for s in in_size)
        convs: List[nn.Module] = []
        for _ in range(3):
            convs += [nn.Conv2d(in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        width = 4 * in_channels
        mlp: List[nn.Module] = []
        for _ in range(3):
            mlp += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
        mlp.append(nn.Linear(width, out_features))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, h: Tensor, backend=None) -> Tensor:
        z = self.convs(F.adaptive_avg_pool2d(h, self.pool_size))
        return self.mlp(F.adaptive_avg_pool2d(z, (2, 2)).flatten(1))
