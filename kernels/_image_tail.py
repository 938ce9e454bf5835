"""``image_context_tail``: ``out = h + avgpool_s(relu(bn(z)))``, the tail of ContSup's image
context encoder E (arXiv 2312.07636, Sec. 3) after its second convolution ``z``."""
from typing import Optional, Tuple

from torch import Tensor

from ._bn_kernels import (batch_or_running_stats, bn_relu_pool_backward, pool_bn_relu_add,
                          register_bn_relu_pool_autograd)
from ._common import bn_fold, check_bn_args, check_tensor, check_vec, define_op, pool_factor, strides4


def _fwd(h: Tensor, z: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor],
         running_var: Optional[Tensor], training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    mean, var = batch_or_running_stats(z, running_mean, running_var, training)
    _, scale, shift = bn_fold(bn_weight, bn_bias, mean, var, eps, mean.dtype)
    sh, sw = int(z.shape[2]) // int(h.shape[2]), int(z.shape[3]) // int(h.shape[3])
    return pool_bn_relu_add(h, z, scale, shift, sh, sw), mean, var


def _bwd(grad_out: Tensor, z: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
         training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    sh, sw = int(z.shape[2]) // int(grad_out.shape[2]), int(z.shape[3]) // int(grad_out.shape[3])
    return bn_relu_pool_backward(grad_out, strides4(grad_out), sh, sw, z, bn_weight, bn_bias, mean,
                                 var, training, eps)


_fwd_op = define_op("image_context_tail", _fwd)
_bwd_op = define_op("image_context_tail_backward", _bwd)

register_bn_relu_pool_autograd(_fwd_op, _bwd_op, residual_input=True)


def _check(h_name, h, z, bn_weight, bn_bias):
    check_tensor(h_name, h, 4)
    check_tensor("z", z, 4, h.device)
    if tuple(z.shape[:2]) != tuple(h.shape[:2]):
        raise ValueError(f"z has (N, C) = {tuple(z.shape[:2])} but {h_name} has "
                         f"{tuple(h.shape[:2])}; they must match")
    pool_factor("z", z, h.shape[-2:], h_name)
    check_vec("bn_weight", bn_weight, int(h.shape[1]), h.device)
    check_vec("bn_bias", bn_bias, int(h.shape[1]), h.device)


def image_context_tail(h, z, bn_weight, bn_bias, running_mean, running_var, training, eps=1e-5):
    """Tail of the image context encoder E (ContSup, arXiv 2312.07636, Sec. 3):
    ``out = h + avgpool_s(relu(bn(z)))``, BatchNorm as in Ioffe & Szegedy (2015).

    Same signature and results as :func:`contsup_fast.fused.reference.image_context_tail_ref`.

    Args:
        h: (N, C, H, W) detached module output; fp32/bf16/fp16/fp64, any memory format.
        z: (N, C, s*H, s*W) output of the encoder's second convolution (integer ``s``, may
            differ between height and width); receives gradient.
        bn_weight, bn_bias: (C,) affine parameters (may be fp32 with 16-bit activations).
        running_mean, running_var: (C,) buffers, required (and read) only when ``training=False``.
        training, eps: BatchNorm mode and epsilon.

    Returns:
        ``(out, mean, var)``: ``out`` in ``h``'s dtype and memory format; in training the fp32
        (fp64 for fp64 ``z``) batch mean and biased variance of ``z``, in eval the running
        buffers themselves.

    Saved for backward: ``z``, ``bn_weight``, ``bn_bias`` and the (C,) statistics.
    Gradients: ``z``, ``bn_weight``, ``bn_bias`` (and ``grad_out`` to ``h`` if it requires grad);
    see :func:`image_context_tail_backward`.

    Raises:
        TypeError / ValueError: wrong type, rank, shape, dtype or device (the message names the
            argument), ``z``'s spatial size not an integer multiple of ``h``'s, or missing running
            statistics in eval mode.
    """
    _check("h", h, z, bn_weight, bn_bias)
    check_bn_args("", int(h.shape[1]), h.device, bn_weight, bn_bias, running_mean, running_var,
                  training)
    out, mean, var = _fwd_op(h, z, bn_weight, bn_bias, running_mean, running_var, bool(training),
                             float(eps))
    if not training:
        return out, running_mean, running_var
    return out, mean, var


def image_context_tail_backward(grad_out, z, bn_weight, bn_bias, mean, var, training, eps=1e-5):
    """Standalone backward of :func:`image_context_tail` (for recomputing ``z`` in backward).

    Args:
        grad_out: (N, C, H, W) gradient of ``out``; ``z``: (N, C, s*H, s*W) the forward input.
        bn_weight, bn_bias: (C,) BatchNorm parameters.
        mean, var: (C,) the statistics the forward returned (batch statistics in training,
            running statistics in eval).
        training, eps: as in the forward.

    Returns:
        ``(grad_z, grad_gamma, grad_beta)``: ``grad_z`` in ``z``'s dtype and memory format,
        the others in the parameters' dtypes. With ``dz = avgpool_s^T(grad_out) * [bn(z) > 0]``,
        ``zhat = (z - mean) * rstd``: ``grad_beta = sum dz``, ``grad_gamma = sum dz*zhat``;
        training: ``grad_z = gamma*rstd*(dz - grad_beta/M - zhat*grad_gamma/M)`` (M = N*sH*sW),
        eval: ``grad_z = gamma*rstd*dz``. Two passes over ``z`` and ``grad_out`` (sums, then
        ``grad_z``).

    Raises:
        TypeError / ValueError: as :func:`image_context_tail`.
    """
    _check("grad_out", grad_out, z, bn_weight, bn_bias)
    check_vec("mean", mean, int(z.shape[1]), z.device)
    check_vec("var", var, int(z.shape[1]), z.device)
    return _bwd_op(grad_out, z, bn_weight, bn_bias, mean, var, bool(training), float(eps))
