"""Plain-PyTorch reference of every fused boundary op.

These functions are the *specification* the Triton (``contsup_fast.kernels``) and
C++/CUDA (``contsup_fast._native``) implementations are tested against, and they are
what ``backend="torch"`` runs. Every op is *functional*: it never mutates BatchNorm
running statistics. Instead it returns the batch statistics it used, and the caller
folds them into the running buffers with :func:`update_running_stats`, exactly as
``nn.BatchNorm2d`` would (``torch.library`` cannot register autograd for mutating ops).

Conventions shared by all ops (ContSup, arXiv 2312.07636, Sec. 3 and Fig. 3):

* feature maps are 4-D ``(N, C, H, W)``, any memory format, dtype fp32/bf16/fp16/fp64;
  statistics and parameter gradients accumulate in fp32 (fp64 stays fp64);
* ``training=True``: BatchNorm normalises with the biased batch variance over
  ``(N, H, W)`` and the op returns ``(mean, var)`` of shape ``(C,)`` (fp32, biased var);
  ``training=False``: BatchNorm uses ``running_mean``/``running_var`` and the op returns
  them unchanged;
* ``h`` (the detached module output) and the context tensors ``c`` receive no gradient;
  gradients flow to the encoder/head parameters (and to ``z`` where stated).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batch_norm_stats",
    "residual_context_ref",
    "image_context_tail_ref",
    "image_context_ref",
    "bn_relu_gap_ref",
    "global_avg_pool_ref",
    "update_running_stats",
]


def batch_norm_stats(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance of ``y`` (N, C, H, W) over (N, H, W), in fp32."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), unbiased=False)
    return mean, var


def _bn_relu(y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
             training: bool) -> Tensor:
    # F.batch_norm with running=None and training=True normalises with batch statistics and
    # differentiates through them; with training=False it uses (mean, var) as constants.
    if training:
        out = F.batch_norm(y, None, None, weight, bias, training=True, eps=eps)
    else:
        out = F.batch_norm(y, mean, var, weight, bias, training=False, eps=eps)
    return F.relu(out)


def _stats(y: Tensor, running_mean: Tensor, running_var: Tensor, training: bool) -> Tuple[Tensor, Tensor]:
    """Batch statistics in training, the running buffers in eval."""
    return batch_norm_stats(y.detach()) if training else (running_mean, running_var)


def _pool_to(z: Tensor, size: Sequence[int]) -> Tensor:
    return F.adaptive_avg_pool2d(z, tuple(size))


def residual_context_ref(
    h: Tensor,
    contexts: Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    bn_weights: Sequence[Tensor],
    bn_biases: Sequence[Tensor],
    running_means: Sequence[Tensor],
    running_vars: Sequence[Tensor],
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """R terms of one boundary: ``out = h + sum_r avgpool(relu(bn_r(conv1x1_r(c_r))))``.

    Args:
        h: (N, C, H, W) detached module output.
        contexts: ``c_r`` of shape (N, C_r, s_r*H, s_r*W), detached; ``s_r`` a positive integer.
        weights: conv1x1 weights, (C, C_r, 1, 1) or (C, C_r).
        biases: conv biases (C,).
        bn_weights, bn_biases: BatchNorm affine parameters (C,).
        running_means, running_vars: BatchNorm buffers (C,), read only when ``training=False``.
        training: batch statistics (True) or running statistics (False).
        eps: BatchNorm epsilon.

    Returns:
        ``(out, means, vars)``: ``out`` (N, C, H, W) in ``h``'s dtype and memory format;
        per term the (C,) fp32 statistics used (biased variance in training).
    """
    out = h
    means: List[Tensor] = []
    vars_: List[Tensor] = []
    for c, w, b, g, beta, rm, rv in zip(contexts, weights, biases, bn_weights, bn_biases,
                                        running_means, running_vars):
        y = F.conv2d(c, w.reshape(w.shape[0], -1, 1, 1), b)
        mean, var = _stats(y, rm, rv, training)
        z = _bn_relu(y, g, beta, mean, var, eps, training)
        out = out + _pool_to(z, h.shape[-2:])
        means.append(mean)
        vars_.append(var)
    return out, means, vars_


def image_context_tail_ref(
    h: Tensor,
    z: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Tail of the image context encoder E: ``out = h + avgpool(relu(bn(z)))``.

    Args:
        h: (N, C, H, W) detached module output.
        z: (N, C, s*H, s*W) output of the encoder's second convolution (receives gradient).
        bn_weight, bn_bias, running_mean, running_var: the encoder's last BatchNorm (C,).

    Returns:
        ``(out, mean, var)`` as in :func:`residual_context_ref`.
    """
    mean, var = _stats(z, running_mean, running_var, training)
    out = h + _pool_to(_bn_relu(z, bn_weight, bn_bias, mean, var, eps, training), h.shape[-2:])
    return out, mean, var


def image_context_ref(
    h: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Second half of the image context encoder E, from its hidden map to the boundary sum:
    ``out = h + avgpool_s(relu(bn(conv3x3(u, weight, bias, padding=1))))``.

    This is the contract of the fused image-context op, whose implementations never
    materialise the full-resolution (N, C, s*H, s*W) convolution output (ContSup,
    arXiv 2312.07636, Fig. 3, "E": Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN -> ReLU -> pool).

    Args:
        h: (N, C, H, W) detached module output (no gradient).
        u: (N, C_in, s*H, s*W) hidden map ``relu(bn1(conv1(x)))`` of E (receives gradient);
            ``s`` a positive integer.
        weight: (C, C_in, 3, 3) and ``bias`` (C,): the second convolution (receive gradient).
        bn_weight, bn_bias, running_mean, running_var: E's last BatchNorm (C,).

    Returns:
        ``(out, mean, var)`` as in :func:`residual_context_ref`; ``mean``/``var`` are the
        statistics of the convolution output over (N, s*H, s*W).
    """
    z = F.conv2d(u, weight, bias, padding=1)
    return image_context_tail_ref(h, z, bn_weight, bn_bias, running_mean, running_var, training, eps)


def bn_relu_gap_ref(
    z: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Auxiliary-head pooling: ``pooled = mean_{H,W} relu(bn(z))``.

    Args:
        z: (N, C, H, W) output of the auxiliary head's last convolution (receives gradient).

    Returns:
        ``(pooled, mean, var)``: ``pooled`` (N, C) in ``z``'s dtype; statistics as above.
    """
    mean, var = _stats(z, running_mean, running_var, training)
    pooled = _bn_relu(z, bn_weight, bn_bias, mean, var, eps, training).mean(dim=(2, 3))
    return pooled, mean, var


def global_avg_pool_ref(h: Tensor) -> Tensor:
    """Global average pooling (N, C, H, W) -> (N, C), for heads without convolution (``0c*``)."""
    return h.mean(dim=(2, 3))


@torch.no_grad()
def update_running_stats(bn: torch.nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """Fold batch statistics into ``bn``'s running buffers exactly as ``nn.BatchNorm2d`` does.

    Args:
        bn: the BatchNorm module whose buffers are updated in place.
        mean, var: (C,) batch mean and *biased* batch variance.
        count: number of elements per channel (N*H*W); the running variance stores the
            unbiased estimate ``var * count / (count - 1)``.
    """
    if not (bn.training and bn.track_running_stats):
        return
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        factor = 1.0 / float(bn.num_batches_tracked)
    else:
        factor = bn.momentum
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
