"""The ``torch`` backend of the fused image-context op: a batch-chunked eager recompute.

``image_context_chunked`` computes exactly :func:`~contsup_fast.fused.reference.image_context_ref`,

    out = h + avgpool_s(relu(bn(conv3x3(u, weight, bias, padding=1)))),

the second half of ContSup's image context encoder E (arXiv 2312.07636, Fig. 3), with eager
PyTorch ops, but never holds the full-resolution convolution output ``z`` (N, C, s*H, s*W)
of the whole batch: it walks the batch in chunks of ``chunk`` images and recomputes ``z`` for
one chunk at a time, so the transient is bounded by one chunk (by default ``ceil(N / s^2)``
images, whose ``z`` is no larger than ``h``). Autograd saves only ``u`` and the per-channel
statistics.

Passes over ``u`` (each one a chunked convolution):

* forward, training: (1) the batch statistics of ``z`` (per-chunk mean and M2, merged with
  Chan et al.'s pairwise update, in fp32); (2) conv -> BN -> ReLU -> pool -> add per chunk.
  Eval: pass (2) with the running statistics.
* backward, training: (1) the BatchNorm sums ``sum(dL/da)`` and ``sum(dL/da * xhat)`` (they
  are also the gradients of the BatchNorm bias and weight); (2) ``dL/dz`` per chunk and the
  convolution's backward (gradients of ``u``, ``weight`` and ``bias``, accumulated in fp32).
  Eval: pass (2) only, with the sums gathered in the same pass.

Compared with the eager encoder (one convolution forward, two in backward) this costs one
more forward convolution in the forward of training and two more in the backward: it trades
FLOPs for memory, like activation checkpointing.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["image_context_chunked", "default_chunk"]


def default_chunk(n: int, scale: int) -> int:
    """Images per chunk: ``ceil(n / scale**2)``, so that one chunk's convolution output
    (chunk, C, s*H, s*W) holds no more elements than ``h`` (n, C, H, W)."""
    return max(1, math.ceil(n / (scale * scale)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv(u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.conv2d(u, weight.to(u.dtype), bias.to(u.dtype), padding=1)


def _upsample(g: Tensor, s: int) -> Tensor:
    """Gradient of avgpool_s: each of the s x s pixels of a window gets g / s^2 (nearest upsampling)."""
    if s == 1:
        return g
    n, c, hh, ww = g.shape
    return (g[:, :, :, None, :, None] / (s * s)).expand(n, c, hh, s, ww, s).reshape(n, c, hh * s, ww * s)


def _batch_stats(u: Tensor, weight: Tensor, bias: Tensor, chunk: int) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of conv3x3(u) over (N, H, W), one chunk at a time."""
    acc = _acc_dtype(u.dtype)
    count = mean = m2 = None
    for uc in u.split(chunk):
        z = _conv(uc, weight, bias)
        var_c, mean_c = torch.var_mean(z.to(acc), dim=(0, 2, 3), unbiased=False)
        n_c = z.shape[0] * z.shape[2] * z.shape[3]
        del z
        if count is None:
            count, mean, m2 = n_c, mean_c, var_c * n_c
            continue
        total = count + n_c
        delta = mean_c - mean
        mean = mean + delta * (n_c / total)
        m2 = m2 + var_c * n_c + delta * delta * (count * n_c / total)
        count = total
    return mean, m2 / count


def _normalise(z: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """xhat = (z - mean) * invstd in the accumulation dtype (a new tensor)."""
    acc = mean.dtype
    xhat = z.to(acc) if z.dtype != acc else z.clone()
    return xhat.sub_(mean[:, None, None]).mul_(invstd[:, None, None])


def _forward(h: Tensor, u: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
             running_mean: Tensor, running_var: Tensor, training: bool, eps: float,
             chunk: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward passes (no autograd): ``(out, mean, var)``, statistics in the accumulation dtype."""
    s = u.shape[-1] // h.shape[-1]
    acc = _acc_dtype(u.dtype)
    with torch.autocast(u.device.type, enabled=False):
        if training:
            mean, var = _batch_stats(u, weight, bias, chunk)
        else:
            mean, var = running_mean.to(acc), running_var.to(acc)
        invstd = torch.rsqrt(var + eps)
        gamma, beta = bn_weight.to(acc)[:, None, None], bn_bias.to(acc)[:, None, None]
        out = torch.empty_like(h, dtype=torch.promote_types(h.dtype, u.dtype))
        for i, (uc, hc) in enumerate(zip(u.split(chunk), h.split(chunk))):
            a = _normalise(_conv(uc, weight, bias), mean, invstd).mul_(gamma).add_(beta).relu_()
            pooled = F.avg_pool2d(a, s) if s > 1 else a
            out[i * chunk:i * chunk + uc.shape[0]] = hc + pooled.to(u.dtype)
            del a, pooled
    return out, mean, var


class _ImageContextChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, chunk):
        out, mean, var = _forward(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                  training, eps, chunk)
        ctx.save_for_backward(u, weight, bias, bn_weight, bn_bias, mean, torch.rsqrt(var + eps))
        ctx.training, ctx.chunk, ctx.scale = training, chunk, u.shape[-1] // h.shape[-1]
        if not training:
            mean, var = running_mean, running_var
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv):
        u, weight, bias, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        chunk, s, acc = ctx.chunk, ctx.scale, mean.dtype
        need_u, need_w, need_b, need_g, need_beta = ctx.needs_input_grad[1:6]
        gamma, beta = bn_weight.to(acc)[:, None, None], bn_bias.to(acc)[:, None, None]
        chunks = list(zip(u.split(chunk), grad_out.split(chunk)))

        def active_grad(uc, gc):
            """xhat and dL/da = dL/dy * 1[a > 0] of one chunk (accumulation dtype)."""
            xhat = _normalise(_conv(uc, weight, bias), mean, invstd)
            ga = _upsample(gc.to(acc), s) * (xhat * gamma + beta > 0)
            return xhat, ga

        with torch.autocast(u.device.type, enabled=False):
            sum_ga = torch.zeros_like(mean)
            sum_ga_xhat = torch.zeros_like(mean)
            count = u.shape[0] * u.shape[2] * u.shape[3]
            if ctx.training:  # pass 1: the BatchNorm sums, which every dL/dz needs
                for uc, gc in chunks:
                    xhat, ga = active_grad(uc, gc)
                    sum_ga += ga.sum(dim=(0, 2, 3))
                    sum_ga_xhat += (ga * xhat).sum(dim=(0, 2, 3))
                    del xhat, ga
            scale = (bn_weight.to(acc) * invstd)[:, None, None]
            grad_u = torch.empty_like(u) if need_u else None
            grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
            if need_u or need_w or need_b or not ctx.training:
                for i, (uc, gc) in enumerate(chunks):  # pass 2: dL/dz and the convolution backward
                    xhat, ga = active_grad(uc, gc)
                    if ctx.training:
                        gz = (ga - (sum_ga / count)[:, None, None]).sub_(xhat * (sum_ga_xhat / count)[:, None, None])
                    else:
                        sum_ga += ga.sum(dim=(0, 2, 3))
                        sum_ga_xhat += (ga * xhat).sum(dim=(0, 2, 3))
                        gz = ga
                    del xhat, ga
                    gz = gz.mul_(scale).to(u.dtype)
                    gu, gw, gb = torch.ops.aten.convolution_backward(
                        gz, uc, weight.to(u.dtype), [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                        [need_u, need_w, need_b])
                    if need_u:
                        grad_u[i * chunk:i * chunk + uc.shape[0]] = gu
                    if need_w:
                        grad_w += gw.to(acc)
                    if need_b:
                        grad_b += gb.to(acc)
                    del gz, gu, gw, gb
        grad_h = grad_out if ctx.needs_input_grad[0] else None
        return (grad_h, grad_u,
                grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                sum_ga_xhat.to(bn_weight.dtype) if need_g else None,
                sum_ga.to(bn_bias.dtype) if need_beta else None,
                None, None, None, None, None)


def _check(h: Tensor, u: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
           running_mean: Tensor, running_var: Tensor, chunk: Optional[int]) -> int:
    if h.dim() != 4 or u.dim() != 4:
        raise ValueError(f"h and u must be 4-D (N, C, H, W), got h {tuple(h.shape)} and u {tuple(u.shape)}")
    n, c, hh, ww = h.shape
    if u.shape[0] != n:
        raise ValueError(f"u must have h's batch size {n}, got u of shape {tuple(u.shape)}")
    sh, sw = u.shape[2], u.shape[3]
    if hh == 0 or ww == 0 or sh % hh or sw % ww or sh // hh != sw // ww or sh < hh:
        raise ValueError(f"u's spatial size {(sh, sw)} must be an integer multiple s >= 1 (the same for height "
                         f"and width) of h's {(hh, ww)}")
    if weight.shape != (c, u.shape[1], 3, 3):
        raise ValueError(f"weight must have shape {(c, u.shape[1], 3, 3)} (C, C_in, 3, 3), got {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer (images per chunk) or None, got {chunk!r}")
    return chunk or default_chunk(n, sh // hh)


def image_context_chunked(
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
    chunk: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``h + avgpool_s(relu(bn(conv3x3(u, weight, bias, padding=1))))`` without the full batch's
    convolution output: the contract of :func:`~contsup_fast.fused.reference.image_context_ref`.

    Args:
        h: (N, C, H, W) detached module output (its gradient, if it needs one, is the output's).
        u: (N, C_in, s*H, s*W) hidden map ``relu(bn1(conv1(x)))`` of the image encoder E, any
            memory format; the convolution runs in ``u``'s dtype (fp32, bf16, fp16 or fp64).
        weight: (C, C_in, 3, 3) and ``bias`` (C,): the second convolution of E.
        bn_weight, bn_bias: (C,) affine parameters of E's last BatchNorm (explicit tensors, so
            a caller may pass scaled ones).
        running_mean, running_var: (C,) its running buffers, read (never written) in eval.
        training: normalise with the batch statistics (True) or the running ones (False).
        eps: BatchNorm epsilon.
        chunk: images per chunk (default :func:`default_chunk`), which bounds the transient to
            one chunk's (chunk, C, s*H, s*W) convolution output and a few same-sized temporaries.

    Returns:
        ``(out, mean, var)``: ``out`` (N, C, H, W) in the promoted dtype of ``h`` and ``u`` and
        ``h``'s memory format; ``mean``/``var`` (C,) the fp32 (fp64 for fp64) batch statistics of
        the convolution output over (N, s*H, s*W) (biased variance), or the running buffers in
        eval. Fold them into the buffers with
        :func:`~contsup_fast.fused.reference.update_running_stats`. Gradients flow to ``u``,
        ``weight``, ``bias``, ``bn_weight`` and ``bn_bias``.

    Raises:
        ValueError: shapes that do not fit (``u`` not an integer multiple of ``h``'s size, a
            weight that is not (C, C_in, 3, 3), ...) or a bad ``chunk``.
    """
    chunk = _check(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var, chunk)
    args = (h, u, weight, bias, bn_weight, bn_bias)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in args)):
        out, mean, var = _forward(*args, running_mean, running_var, bool(training), float(eps), chunk)
        return (out, mean, var) if training else (out, running_mean, running_var)
    return _ImageContextChunked.apply(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                      bool(training), float(eps), chunk)
