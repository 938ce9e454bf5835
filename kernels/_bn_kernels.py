"""Per-channel BatchNorm + ReLU + average-pool kernels, shared by ``image_context_tail``,
``bn_relu_gap`` and ``global_avg_pool``.

All tensors are addressed through their strides (contiguous, channels_last or any other
layout, no copies). Tiles are ``[BLOCK_C channels, BLOCK_P pixels]``; reductions are
two-stage: each program writes per-channel partial sums of its pixel chunk and a tiny
torch finalize adds the ``splits`` partials (deterministic, no atomics).

Pooling geometry: a pixel ``(n, h, w)`` of ``x`` (N, C, H, W) belongs to the pooled
position ``(n, h // KH, w // KW)``; ``KH = KW = s`` for the context tail and
``KH, KW = H, W`` (one window) for global pooling.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, add_base, bn_fold, chunk_block, chunk_bounds, launch, pixel_block,
                      pow2, resident_programs, split_pixels, split_plan, strides4, to_acc, zeros_acc)

MODE_STATS, MODE_POOL, MODE_BWD = 0, 1, 2


@triton.jit
def _chan_reduce_kernel(
    x_ptr, xN, xC, xH, xW, C, HW, W, P, CHUNK,
    g_ptr, gN, gC, gH, gW, KH, KW,
    scale_ptr, shift_ptr, mean_ptr, part0_ptr, part1_ptr,
    MODE: tl.constexpr, APPLY_BN: tl.constexpr, FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per-channel sums over the pixel chunk ``[sp*CHUNK, (sp+1)*CHUNK)`` of ``x``.

    MODE_STATS: part0 = sum(x - x[0,c,0,0]), part1 = sum((x - x[0,c,0,0])^2)  (shifted data)
    MODE_POOL:  part0 = sum(relu(x*scale + shift))  (or sum(x) without APPLY_BN)
    MODE_BWD:   dz = g[pooled] * (x*scale + shift > 0); part0 = sum(dz), part1 = sum(dz*(x-mean))
    """
    sp = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = co < C
    if MODE == 0:
        pivot = to_acc(tl.load(x_ptr + co * xC, mask=mc, other=0), FP64)
    if APPLY_BN:
        scale = tl.load(scale_ptr + co, mask=mc, other=0)[:, None]
        shift = tl.load(shift_ptr + co, mask=mc, other=0)[:, None]
    if MODE == 2:
        mean = tl.load(mean_ptr + co, mask=mc, other=0)[:, None]
    s0 = zeros_acc(BLOCK_C, BLOCK_P, FP64)
    s1 = zeros_acc(BLOCK_C, BLOCK_P, FP64)
    start, end = chunk_bounds(sp, CHUNK, P)
    for p0 in range(start, end, BLOCK_P):
        mp, n, h, w = chunk_block(p0, end, HW, W, BLOCK_P)
        m2 = mc[:, None] & mp[None, :]
        x = tl.load(x_ptr + n[None, :] * xN + co[:, None] * xC + (h * xH + w * xW)[None, :],
                    mask=m2, other=0)
        x = to_acc(x, FP64)
        if MODE == 0:
            d = tl.where(m2, x - pivot[:, None], 0.0)
            s0 += d
            s1 += d * d
        elif MODE == 1:
            if APPLY_BN:
                x = tl.where(m2, tl.maximum(x * scale + shift, 0.0), 0.0)
            s0 += x
        else:
            g_off = n[None, :] * gN + co[:, None] * gC + ((h // KH) * gH + (w // KW) * gW)[None, :]
            g = to_acc(tl.load(g_ptr + g_off, mask=m2, other=0), FP64)
            dz = tl.where(x * scale + shift > 0, g, 0.0)
            s0 += dz
            s1 += dz * (x - mean)
    tl.store(part0_ptr + sp * C + co, tl.sum(s0, 1), mask=mc)
    if MODE != 1:
        tl.store(part1_ptr + sp * C + co, tl.sum(s1, 1), mask=mc)


@triton.jit
def _pool_bn_relu_add_kernel(
    z_ptr, zN, zC, zH, zW, h_ptr, hN, hC, hH, hW, o_ptr, oN, oC, oH, oW,
    scale_ptr, shift_ptr, C, HO, WO, Q, SH, SW,
    FP64: tl.constexpr, H_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """out[n,c,i,j] = h[n,c,i,j] + mean_{a<SH,b<SW} relu(z[n,c,i*SH+a,j*SW+b]*scale+shift)."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m2 = (co < C)[:, None] & (q < Q)[None, :]
    n, i, j = split_pixels(q, HO * WO, WO)
    scale = tl.load(scale_ptr + co, mask=co < C, other=0)[:, None]
    shift = tl.load(shift_ptr + co, mask=co < C, other=0)[:, None]
    acc = zeros_acc(BLOCK_C, BLOCK_Q, FP64)
    z_base = z_ptr + n[None, :] * zN + co[:, None] * zC
    for a in range(SH):
        for b in range(SW):
            pos = ((i * SH + a) * zH + (j * SW + b) * zW)[None, :]
            x = to_acc(tl.load(z_base + pos, mask=m2, other=0), FP64)
            acc += tl.maximum(x * scale + shift, 0.0)
    hv = tl.load(h_ptr + n[None, :] * hN + co[:, None] * hC + (i * hH + j * hW)[None, :], mask=m2)
    res = add_base(hv, acc * (1.0 / (SH * SW)), FP64, H_FP64)
    o_off = n[None, :] * oN + co[:, None] * oC + (i * oH + j * oW)[None, :]
    tl.store(o_ptr + o_off, res.to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bn_relu_grad_kernel(
    x_ptr, xN, xC, xH, xW, g_ptr, gN, gC, gH, gW, KH, KW, o_ptr, oN, oC, oH, oW,
    scale_ptr, shift_ptr, k1_ptr, k2_ptr, k3_ptr, C, HW, W, P,
    APPLY_BN: tl.constexpr, FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_x = k1*dz + k2*x + k3 with dz = g[pooled] * (x*scale+shift > 0) (APPLY_BN),
    else grad_x = k1 * g[pooled] (plain average pooling)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = co < C
    m2 = mc[:, None] & (p < P)[None, :]
    n, h, w = split_pixels(p, HW, W)
    g_off = n[None, :] * gN + co[:, None] * gC + ((h // KH) * gH + (w // KW) * gW)[None, :]
    g = to_acc(tl.load(g_ptr + g_off, mask=m2, other=0), FP64)
    k1 = tl.load(k1_ptr + co, mask=mc, other=0)[:, None]
    if APPLY_BN:
        x_off = n[None, :] * xN + co[:, None] * xC + (h * xH + w * xW)[None, :]
        x = to_acc(tl.load(x_ptr + x_off, mask=m2, other=0), FP64)
        scale = tl.load(scale_ptr + co, mask=mc, other=0)[:, None]
        shift = tl.load(shift_ptr + co, mask=mc, other=0)[:, None]
        k2 = tl.load(k2_ptr + co, mask=mc, other=0)[:, None]
        k3 = tl.load(k3_ptr + co, mask=mc, other=0)[:, None]
        res = k1 * tl.where(x * scale + shift > 0, g, 0.0) + k2 * x + k3
    else:
        res = k1 * g
    o_off = n[None, :] * oN + co[:, None] * oC + (h * oH + w * oW)[None, :]
    tl.store(o_ptr + o_off, res.to(o_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------------
# launch helpers (called from op bodies; plain torch for the tiny (C,)-sized finalize)
# ----------------------------------------------------------------------------------------
def _tiles(C: int, P: int) -> Tuple[int, int]:
    block_c = pow2(C, 1, 32)
    return block_c, pixel_block(P, max(16, 4096 // block_c))


def _chan_reduce(x: torch.Tensor, mode: int, *, g=None, g_strides=(0, 0, 0, 0), kh=1, kw=1,
                 scale=None, shift=None, mean=None, apply_bn=True, per_image=False):
    """Launch ``_chan_reduce_kernel``; returns the partial sums ``(2, splits, C)``.
    ``per_image``: one split per image (MODE_POOL), so the partials are per-(n, c) sums."""
    N, C, H, W = (int(s) for s in x.shape)
    acc = acc_dtype(x.dtype)
    P = N * H * W
    block_c, block_p = _tiles(C, H * W if per_image else P)
    g = x if g is None else g
    meta = dict(MODE=mode, APPLY_BN=(mode != MODE_STATS and apply_bn), FP64=acc == torch.float64,
                BLOCK_C=block_c, BLOCK_P=block_p)
    args = [x, *strides4(x), C, H * W, W, P, H * W if per_image else block_p, g, *g_strides, kh,
            kw, acc if scale is None else scale, acc if shift is None else shift,
            acc if mean is None else mean, acc, acc]  # acc: buffers to come
    if per_image:
        splits, chunk = N, H * W
    else:
        resident = resident_programs(_chan_reduce_kernel, args, meta, x.device)
        splits, chunk = split_plan(P, block_p, triton.cdiv(C, block_c), x.device, resident)
    part = torch.empty((2, splits, C), dtype=acc, device=x.device)
    args[9] = chunk
    args[-5:] = [part[0] if a is acc else a for a in args[-5:-2]] + [part[0], part[1]]
    launch(_chan_reduce_kernel, (splits, triton.cdiv(C, block_c)), *args, **meta)
    return part


def channel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` over (N, H, W) (acc dtype).
    Sums of data shifted by ``x[0, c, 0, 0]`` keep the variance free of cancellation."""
    part = _chan_reduce(x, MODE_STATS)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    d_mean = part[0].sum(0) / count
    var = (part[1].sum(0) / count - d_mean * d_mean).clamp_min(0)
    return x[0, :, 0, 0].to(part.dtype) + d_mean, var


def batch_or_running_stats(x, running_mean, running_var, training: bool):
    """Statistics the op normalises with: fresh tensors (an op output must not alias an input)."""
    if training:
        return channel_stats(x)
    acc = acc_dtype(x.dtype)
    return running_mean.to(acc, copy=True), running_var.to(acc, copy=True)


def pool_bn_relu_add(h: torch.Tensor, z: torch.Tensor, scale, shift, sh: int, sw: int) -> torch.Tensor:
    """``h + avgpool_(sh, sw)(relu(z * scale + shift))`` in ``h``'s dtype and memory format."""
    out = torch.empty_like(h)
    N, C, HO, WO = (int(s) for s in h.shape)
    Q = N * HO * WO
    block_c, block_q = _tiles(C, Q)
    launch(_pool_bn_relu_add_kernel, (triton.cdiv(Q, block_q), triton.cdiv(C, block_c)),
           z, *strides4(z), h, *strides4(h), out, *strides4(out), scale, shift, C, HO, WO, Q, sh, sw,
           FP64=acc_dtype(z.dtype) == torch.float64, H_FP64=h.dtype == torch.float64,
           BLOCK_C=block_c, BLOCK_Q=block_q)
    return out


def bn_relu_pool_backward(grad: torch.Tensor, g_strides, kh: int, kw: int, z: torch.Tensor,
                          gamma, beta, mean, var, training: bool, eps: float):
    """Backward of ``avgpool_(kh, kw)(relu(bn(z)))`` given the pooled gradient ``grad``
    (addressed through ``g_strides`` as an (N, C, H/kh, W/kw) tensor).

    Returns ``(grad_z, grad_gamma, grad_beta)``. With ``dz = grad[pooled]/(kh*kw) * [bn(z) > 0]``
    and ``zhat = (z - mean) * rstd`` (BatchNorm, Ioffe & Szegedy 2015):
    ``dbeta = sum dz``, ``dgamma = sum dz*zhat``, and in training
    ``grad_z = gamma*rstd*(dz - dbeta/M - zhat*dgamma/M)``, in eval ``grad_z = gamma*rstd*dz``.
    """
    acc = acc_dtype(z.dtype)
    N, C, H, W = (int(s) for s in z.shape)
    M = N * H * W
    inv_win = 1.0 / (kh * kw)
    mean, var = mean.to(acc), var.to(acc)
    rstd, scale, shift = bn_fold(gamma, beta, mean, var, eps, acc)
    part = _chan_reduce(z, MODE_BWD, g=grad, g_strides=g_strides, kh=kh, kw=kw, scale=scale,
                        shift=shift, mean=mean)
    dbeta = part[0].sum(0) * inv_win
    dgamma = part[1].sum(0) * (inv_win * rstd)
    k1 = scale * inv_win
    if training:
        k2 = -scale * rstd * dgamma / M
        k3 = -scale * dbeta / M - k2 * mean
    else:
        k2, k3 = torch.zeros_like(k1), torch.zeros_like(k1)
    grad_z = torch.empty_like(z)
    block_c, block_p = _tiles(C, M)
    launch(_bn_relu_grad_kernel, (triton.cdiv(M, block_p), triton.cdiv(C, block_c)),
           z, *strides4(z), grad, *g_strides, kh, kw, grad_z, *strides4(grad_z),
           scale, shift, k1, k2, k3, C, H * W, W, M,
           APPLY_BN=True, FP64=acc == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p)
    return grad_z, dgamma.to(gamma.dtype), dbeta.to(beta.dtype)


def avg_pool_backward(grad: torch.Tensor, g_strides, like: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Gradient of a (kh, kw) average pool: ``grad[pooled] / (kh*kw)`` in ``like``'s layout."""
    out = torch.empty_like(like)
    N, C, H, W = (int(s) for s in like.shape)
    M = N * H * W
    k1 = torch.full((C,), 1.0 / (kh * kw), dtype=acc_dtype(like.dtype), device=like.device)
    block_c, block_p = _tiles(C, M)
    launch(_bn_relu_grad_kernel, (triton.cdiv(M, block_p), triton.cdiv(C, block_c)),
           out, *strides4(out), grad, *g_strides, kh, kw, out, *strides4(out),
           k1, k1, k1, k1, k1, C, H * W, W, M,
           APPLY_BN=False, FP64=k1.dtype == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p)
    return out


def register_bn_relu_pool_autograd(fwd_op, bwd_op, residual_input: bool) -> None:
    """Autograd of a BatchNorm + ReLU + pool op: forward inputs
    ``([h,] z, bn_weight, bn_bias, running_mean, running_var, training, eps)``, outputs
    ``(out, mean, var)``; ``bwd_op(grad, z, bn_weight, bn_bias, mean, var, training, eps)``
    returns ``(grad_z, grad_gamma, grad_beta)``. Saves ``z``, the parameters and the (C,)
    statistics. With ``residual_input`` the leading ``h`` (``out = h + ...``) receives
    ``grad`` unchanged."""
    first = 1 if residual_input else 0

    def setup_context(ctx, inputs, output):
        z, bn_weight, bn_bias, _, _, training, eps = inputs[first:]
        _, mean, var = output
        ctx.training, ctx.eps = training, eps
        ctx.save_for_backward(z, bn_weight, bn_bias, mean, var)

    def backward(ctx, grad, *_):
        z, w, b, mean, var = ctx.saved_tensors
        grad_z, grad_w, grad_b = bwd_op(grad, z, w, b, mean, var, ctx.training, ctx.eps)
        grad_h = (grad,) if residual_input else ()
        return (*grad_h, grad_z, grad_w, grad_b, None, None, None, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)
