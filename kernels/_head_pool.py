"""Auxiliary-head pooling: ``bn_relu_gap`` (``mean_{H,W} relu(bn(z))``) and
``global_avg_pool`` (``mean_{H,W} h``), ContSup (arXiv 2312.07636) Sec. 3 local heads."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._bn_kernels import (MODE_POOL, _chan_reduce, avg_pool_backward, batch_or_running_stats,
                          bn_relu_pool_backward, register_bn_relu_pool_autograd)
from ._common import bn_fold, check_bn_args, check_tensor, define_op


def _pooled_strides(g: Tensor):
    """Address an (N, C) gradient as an (N, C, 1, 1) tensor."""
    return int(g.stride(0)), int(g.stride(1)), 0, 0


# ---------------------------------------------------------------- bn_relu_gap
def _gap_fwd(z: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
             running_var: Optional[Tensor], training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    mean, var = batch_or_running_stats(z, running_mean, running_var, training)
    _, scale, shift = bn_fold(bn_weight, bn_bias, mean, var, eps, mean.dtype)
    part = _chan_reduce(z, MODE_POOL, scale=scale, shift=shift, per_image=True)
    pooled = (part[0] * (1.0 / (int(z.shape[2]) * int(z.shape[3])))).to(z.dtype)
    return pooled, mean, var


def _gap_bwd(grad: Tensor, z: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
             training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return bn_relu_pool_backward(grad, _pooled_strides(grad), int(z.shape[2]), int(z.shape[3]), z,
                                 bn_weight, bn_bias, mean, var, training, eps)


_gap_fwd_op = define_op("bn_relu_gap", _gap_fwd)
_gap_bwd_op = define_op("bn_relu_gap_backward", _gap_bwd)

register_bn_relu_pool_autograd(_gap_fwd_op, _gap_bwd_op, residual_input=False)


def bn_relu_gap(z, bn_weight, bn_bias, running_mean, running_var, training, eps=1e-5):
    """Auxiliary-head pooling (ContSup, arXiv 2312.07636, Sec. 3):
    ``pooled[n, c] = mean_{h,w} relu(bn(z))[n, c, h, w]``; BatchNorm (Ioffe & Szegedy, 2015)
    with batch statistics (biased variance) in training, running statistics in eval.

    Same signature and results as :func:`contsup_fast.fused.reference.bn_relu_gap_ref`.

    Args:
        z: (N, C, H, W) output of the head's last convolution; fp32/bf16/fp16/fp64, any memory
            format; receives gradient.
        bn_weight, bn_bias: (C,) affine parameters (may be fp32 with 16-bit ``z``).
        running_mean, running_var: (C,) buffers, required (and read) only when ``training=False``.
        training, eps: BatchNorm mode and epsilon.

    Returns:
        ``(pooled, mean, var)``: ``pooled`` (N, C) in ``z``'s dtype; in training the fp32 (fp64
        for fp64 ``z``) batch mean and biased variance, in eval the running buffers themselves.

    Saved for backward: ``z``, ``bn_weight``, ``bn_bias`` and the (C,) statistics. Backward:
    ``dz = grad[n, c] / (H*W) * [bn(z) > 0]``, ``grad_beta = sum dz``,
    ``grad_gamma = sum dz*zhat``, ``grad_z = gamma*rstd*(dz - grad_beta/M - zhat*grad_gamma/M)``
    in training (``gamma*rstd*dz`` in eval).

    Raises:
        TypeError / ValueError: wrong type, rank, shape, dtype or device (the message names the
            argument), or missing running statistics in eval mode.
    """
    check_tensor("z", z, 4)
    check_bn_args("", int(z.shape[1]), z.device, bn_weight, bn_bias, running_mean, running_var,
                  training)
    pooled, mean, var = _gap_fwd_op(z, bn_weight, bn_bias, running_mean, running_var,
                                    bool(training), float(eps))
    if not training:
        return pooled, running_mean, running_var
    return pooled, mean, var


# ---------------------------------------------------------------- global_avg_pool
def _avg_fwd(h: Tensor) -> Tensor:
    part = _chan_reduce(h, MODE_POOL, apply_bn=False, per_image=True)
    return (part[0] * (1.0 / (int(h.shape[2]) * int(h.shape[3])))).to(h.dtype)


def _avg_bwd(grad: Tensor, H: int, W: int, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((grad.shape[0], grad.shape[1], H, W), dtype=grad.dtype, device=grad.device,
                      memory_format=fmt)
    return avg_pool_backward(grad, _pooled_strides(grad), out, H, W)


_avg_fwd_op = define_op("global_avg_pool", _avg_fwd)
_avg_bwd_op = define_op("global_avg_pool_backward", _avg_bwd)


def _avg_setup(ctx, inputs, output):
    (h,) = inputs
    ctx.hw = (int(h.shape[2]), int(h.shape[3]))
    ctx.channels_last = (h.dim() == 4 and not h.is_contiguous()
                         and h.is_contiguous(memory_format=torch.channels_last))


def _avg_backward(ctx, grad):
    return _avg_bwd_op(grad, ctx.hw[0], ctx.hw[1], ctx.channels_last)


_avg_fwd_op.register_autograd(_avg_backward, setup_context=_avg_setup)


def global_avg_pool(h):
    """Global average pooling ``(N, C, H, W) -> (N, C)`` for heads without convolution
    (ContSup ``0c*`` heads), ``pooled[n, c] = mean_{h,w} h[n, c, h, w]``.

    Same results as :func:`contsup_fast.fused.reference.global_avg_pool_ref`.

    Args:
        h: (N, C, H, W), fp32/bf16/fp16/fp64, any memory format.

    Returns:
        (N, C) in ``h``'s dtype (fp32/fp64 accumulation).

    Saved for backward: only ``h``'s spatial size and memory format; backward writes
    ``grad[n, c] / (H*W)`` broadcast over (H, W), in ``h``'s memory format.

    Raises:
        TypeError / ValueError: wrong type, rank, dtype or device (the message names ``h``).
    """
    check_tensor("h", h, 4)
    return _avg_fwd_op(h)
