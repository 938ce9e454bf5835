"""``residual_context``: ``out = h + sum_r avgpool_s(relu(bn_r(conv1x1_r(c_r))))``.

ContSup (arXiv 2312.07636, Sec. 3, Fig. 3) adds to a module output ``h`` the stored,
detached context ``c_r`` of earlier modules, each through a 1x1 conv + BatchNorm + ReLU and
average-pooled to ``h``'s resolution. The conv output ``y = W c + b`` is never written to
memory:

* batch statistics (training) follow from the first and second moments of ``c``:
  ``mean_y = W m + b`` and ``var_y = diag(W S W^T)`` with ``m``, ``S`` the mean and biased
  covariance of ``c`` over (N, sH, sW) -- one Gram pass over ``c`` (``_ctx_gram_kernel``);
* the apply pass (``_ctx_apply_kernel``) recomputes ``y`` tile by tile on tensor cores
  (fp32 accumulation), applies the BatchNorm as a per-channel ``scale, shift`` and ReLU, pools
  and adds ``h``; up to three terms of one dtype share a launch so ``out`` is written once;
* backward (``_ctx_grad_kernel``) makes one pass over ``c`` and ``grad_out``, recomputing
  the ReLU mask, and gathers ``D = sum dz`` and ``G = sum dz (c - m)^T`` (C x C_r; ``m`` the
  batch mean of ``c`` in training, 0 in eval); the closed form (BatchNorm, Ioffe & Szegedy
  2015) is ``dbeta = D`` and
  train: ``dgamma = rstd*rowsum(W*G)``, ``dW = gamma*rstd*(G - dgamma*rstd*W S)``, ``db = 0``;
  eval: ``dgamma = rstd*(rowsum(W*G) + (b - mean) D)``, ``dW = gamma*rstd*G``,
  ``db = gamma*rstd*D``.
"""
from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (FLOAT_DTYPES, acc_dtype, add_base, bn_fold, check_sequences, check_tensor,
                      check_vec, chunk_block, chunk_bounds, define_op, dot_config, launch,
                      launch_split_sums, mma, pixel_block, pool_factor, pow2, resident_programs,
                      split_pixels, split_plan, strides4, to_acc, zeros_acc)

MAX_TERMS = 3  # context terms fused into one apply launch


def _grad_warps(block_c: int, block_k: int, two_byte_channels_last: bool = False) -> int:
    """Warps of ``_ctx_grad_kernel``: 8 for (64, >= 32) tiles (at 4 they sit at 255 registers
    in fp32 on sm_90), else 4 (8 warps spill on (16, 16) bf16 tiles); but 4 for 16-bit (64, 64)
    tiles of a channels-last context (at 8, ptxas holds them to 128 registers on sm_80 and
    spills 40 B; with NCHW strides 4 warps spill 40-336 B, 8 do not). Measured with
    ``python -m contsup_fast.kernels.compile_report`` (docs/gpu-validation.md)."""
    if two_byte_channels_last and block_c * block_k >= 64 * 64:
        return 4
    return 8 if block_c * block_k >= 64 * 32 else 4


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _ctx_gram_kernel(
    c_ptr, sN, sC, sH, sW, CR, HW, W, P, CHUNK, gram_ptr, sum_ptr,
    SHIFT: tl.constexpr, FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial Gram matrix ``sum_p c_p c_p^T`` (tile (ti, tj), ti <= tj only) and channel sums
    of the pixel chunk of split ``sp``; with ``SHIFT`` the data is shifted by ``c[0,:,0,0]``."""
    sp = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if tj >= ti:
        ki = ti * BLOCK_K + tl.arange(0, BLOCK_K)
        kj = tj * BLOCK_K + tl.arange(0, BLOCK_K)
        mki = ki < CR
        mkj = kj < CR
        if SHIFT:
            piv_i = to_acc(tl.load(c_ptr + ki * sC, mask=mki, other=0), FP64)
            piv_j = to_acc(tl.load(c_ptr + kj * sC, mask=mkj, other=0), FP64)
        acc = zeros_acc(BLOCK_K, BLOCK_K, FP64)
        s1 = zeros_acc(BLOCK_K, BLOCK_P, FP64)
        start, end = chunk_bounds(sp, CHUNK, P)
        for p0 in range(start, end, BLOCK_P):
            mp, n, h, w = chunk_block(p0, end, HW, W, BLOCK_P)
            off = n * sN + h * sH + w * sW
            mi = mki[:, None] & mp[None, :]
            mj = mp[:, None] & mkj[None, :]
            xi = tl.load(c_ptr + ki[:, None] * sC + off[None, :], mask=mi, other=0)
            xj = tl.load(c_ptr + off[:, None] + kj[None, :] * sC, mask=mj, other=0)
            if SHIFT:
                xi = tl.where(mi, to_acc(xi, FP64) - piv_i[:, None], 0.0)
                xj = tl.where(mj, to_acc(xj, FP64) - piv_j[None, :], 0.0)
            acc = mma(xi, xj, acc, PREC, UPCAST)
            s1 += to_acc(xi, FP64)
        tl.store(gram_ptr + sp * CR * CR + ki[:, None] * CR + kj[None, :], acc,
                 mask=mki[:, None] & mkj[None, :])
        if ti == tj:
            tl.store(sum_ptr + sp * CR + ki, tl.sum(s1, 1), mask=mki)


@triton.jit
def _ctx_preact(c_ptr, c_off, sC, CR, w_ptr, co, mc, mq, scale, shift,
                FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_Q: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """BatchNorm'd conv output ``(W[co, :] @ c[:, q]) * scale[co] + shift[co]``, a
    [BLOCK_C, BLOCK_Q] tile; ``c_off`` holds the offsets of the BLOCK_Q pixels (channel 0)."""
    acc = zeros_acc(BLOCK_C, BLOCK_Q, FP64)
    for k0 in range(0, CR, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < CR
        wt = tl.load(w_ptr + co[:, None] * CR + k[None, :], mask=mc[:, None] & mk[None, :], other=0)
        ct = tl.load(c_ptr + k[:, None] * sC + c_off[None, :], mask=mk[:, None] & mq[None, :], other=0)
        acc = mma(wt, ct, acc, PREC, UPCAST)
    return acc * scale[:, None] + shift[:, None]


@triton.jit
def _ctx_term(acc, n, i, j, co, mc, mq, C, c_ptr, sN, sC, sH, sW, CR, w_ptr, bn_ptr, SH, SW,
              FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_Q: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + mean_{a<SH, b<SW} relu(preact(c[n, :, i*SH+a, j*SW+b]))`` for one term;
    ``bn_ptr`` points at the (2, C) folded BatchNorm (scale; shift)."""
    scale = tl.load(bn_ptr + co, mask=mc, other=0)
    shift = tl.load(bn_ptr + C + co, mask=mc, other=0)
    part = zeros_acc(BLOCK_C, BLOCK_Q, FP64)
    for a in range(SH):
        for b in range(SW):
            c_off = n * sN + (i * SH + a) * sH + (j * SW + b) * sW
            y = _ctx_preact(c_ptr, c_off, sC, CR, w_ptr, co, mc, mq, scale, shift,
                            FP64, BLOCK_C, BLOCK_K, BLOCK_Q, PREC, UPCAST)
            part += tl.maximum(y, 0.0)
    return acc + part * (1.0 / (SH * SW))


@triton.jit
def _ctx_apply_kernel(
    h_ptr, hN, hC, hH, hW, o_ptr, oN, oC, oH, oW, C, HO, WO, Q,
    c0, c0N, c0C, c0H, c0W, CR0, w0, b0, SH0, SW0,
    c1, c1N, c1C, c1H, c1W, CR1, w1, b1, SH1, SW1,
    c2, c2N, c2C, c2H, c2W, CR2, w2, b2, SH2, SW2,
    NT: tl.constexpr, FP64: tl.constexpr, H_FP64: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """out = h + sum over the NT (<= 3) terms of the pooled relu(bn(conv1x1(c)))."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mq = q < Q
    mc = co < C
    n, i, j = split_pixels(q, HO * WO, WO)
    acc = zeros_acc(BLOCK_C, BLOCK_Q, FP64)
    acc = _ctx_term(acc, n, i, j, co, mc, mq, C, c0, c0N, c0C, c0H, c0W, CR0, w0, b0, SH0, SW0,
                    FP64, BLOCK_C, BLOCK_K, BLOCK_Q, PREC, UPCAST)
    if NT >= 2:
        acc = _ctx_term(acc, n, i, j, co, mc, mq, C, c1, c1N, c1C, c1H, c1W, CR1, w1, b1, SH1, SW1,
                        FP64, BLOCK_C, BLOCK_K, BLOCK_Q, PREC, UPCAST)
    if NT >= 3:
        acc = _ctx_term(acc, n, i, j, co, mc, mq, C, c2, c2N, c2C, c2H, c2W, CR2, w2, b2, SH2, SW2,
                        FP64, BLOCK_C, BLOCK_K, BLOCK_Q, PREC, UPCAST)
    m2 = mc[:, None] & mq[None, :]
    hv = tl.load(h_ptr + n[None, :] * hN + co[:, None] * hC + (i * hH + j * hW)[None, :], mask=m2)
    res = add_base(hv, acc, FP64, H_FP64)
    o_off = n[None, :] * oN + co[:, None] * oC + (i * oH + j * oW)[None, :]
    tl.store(o_ptr + o_off, res.to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _ctx_grad_kernel(
    g_ptr, gN, gC, gH, gW, C, HO, WO, Q, QCHUNK,
    c_ptr, sN, sC, sH, sW, CR, w_ptr, bn_ptr, center_ptr, SH, SW, gpart_ptr, dpart_ptr,
    FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial ``G[co, k] = sum dz (c_k - center_k)`` (tile (co, k)) and ``D[co] = sum dz``
    over the output positions of split ``sp``, with ``dz = grad_out[pooled] * [preact > 0]``
    (the 1/(SH*SW) of the pool is applied in the finalize). Centering ``c`` (by its batch mean
    in training) before the 16-bit dot keeps the rounding relative to the centred values."""
    sp = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    kk = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mc = co < C
    mkk = kk < CR
    scale = tl.load(bn_ptr + co, mask=mc, other=0)
    shift = tl.load(bn_ptr + C + co, mask=mc, other=0)
    center = tl.load(center_ptr + kk, mask=mkk, other=0)
    G = zeros_acc(BLOCK_C, BLOCK_K, FP64)
    D = tl.sum(zeros_acc(BLOCK_C, BLOCK_Q, FP64), 1)  # (BLOCK_C,): reduced every step
    start, end = chunk_bounds(sp, QCHUNK, Q)
    for q0 in range(start, end, BLOCK_Q):
        mq, n, i, j = chunk_block(q0, end, HO * WO, WO, BLOCK_Q)
        g_off = n[None, :] * gN + co[:, None] * gC + (i * gH + j * gW)[None, :]
        g = to_acc(tl.load(g_ptr + g_off, mask=mc[:, None] & mq[None, :], other=0), FP64)
        for a in range(SH):
            for b in range(SW):
                c_off = n * sN + (i * SH + a) * sH + (j * SW + b) * sW
                y = _ctx_preact(c_ptr, c_off, sC, CR, w_ptr, co, mc, mq, scale, shift,
                                FP64, BLOCK_C, BLOCK_K, BLOCK_Q, PREC, UPCAST)
                dz = tl.where(y > 0, g, 0.0)
                D += tl.sum(dz, 1)
                mk2 = mq[:, None] & mkk[None, :]
                ck = tl.load(c_ptr + c_off[:, None] + kk[None, :] * sC, mask=mk2, other=0)
                ckc = tl.where(mk2, to_acc(ck, FP64) - center[None, :], 0.0).to(ck.dtype)
                G = mma(dz.to(ck.dtype), ckc, G, PREC, UPCAST)
    tl.store(gpart_ptr + sp * C * CR + co[:, None] * CR + kk[None, :], G,
             mask=mc[:, None] & mkk[None, :])
    if tl.program_id(2) == 0:
        tl.store(dpart_ptr + sp * C + co, D, mask=mc)


# ----------------------------------------------------------------------------------------
# launch helpers and finalize (tiny (C,) / (C, C_r) torch math)
# ----------------------------------------------------------------------------------------
def _context_moments(c: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean ``m`` (C_r,) and biased covariance ``S`` (C_r, C_r) of ``c`` over (N, H, W)."""
    N, CR, H, W = (int(s) for s in c.shape)
    P = N * H * W
    acc = acc_dtype(c.dtype)
    shift = c.dtype in (torch.float32, torch.float64)  # 16-bit: exact products, no shift
    _, prec, upcast = dot_config(c.dtype, stats=True)
    big = 32 if acc == torch.float64 else 64  # fp64 tiles: keep shared memory < 100 KB
    block_k, block_p = pow2(CR, 16, big), pixel_block(P, 32)
    kt = triton.cdiv(CR, block_k)
    meta = dict(SHIFT=shift, FP64=acc == torch.float64, BLOCK_K=block_k, BLOCK_P=block_p,
                PREC=prec, UPCAST=upcast, num_stages=2)
    args = [c, *strides4(c), CR, H * W, W, P, block_p, acc, acc]  # acc: buffers to come
    resident = resident_programs(_ctx_gram_kernel, args, meta, c.device)
    splits, chunk = split_plan(P, block_p, kt * kt, c.device, resident)  # grid (splits, kt, kt)
    gram = torch.empty((splits, CR, CR), dtype=acc, device=c.device)
    sums = torch.empty((splits, CR), dtype=acc, device=c.device)
    args[9:] = [chunk, gram, sums]
    launch(_ctx_gram_kernel, (splits, kt, kt), *args, **meta)
    d = sums.sum(0) / P
    tile = torch.arange(CR, device=c.device) // block_k
    g = gram.sum(0)
    g = torch.where(tile[:, None] <= tile[None, :], g, g.transpose(0, 1))  # mirror lower tiles
    cov = g / P - d[:, None] * d[None, :]
    pivot = c[0, :, 0, 0].to(acc) if shift else torch.zeros_like(d)
    return pivot + d, cov


def _fold_conv_bn(W: Tensor, b: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor,
                  eps: float, dot_dtype: torch.dtype):
    """``bn(W c + b) = (W c) * scale + shift``. Returns ``(rstd, scale, w_dot, bn)`` with
    ``w_dot`` = W (C, C_r) contiguous in the dot dtype (rounded like an autocast conv weight;
    the BatchNorm scale is applied in fp32 after the dot) and ``bn`` = stack(scale, shift)."""
    rstd, scale, shift = bn_fold(gamma, beta, mean, var, eps, W.dtype)
    bn = torch.stack((scale, shift + b * scale))
    return rstd, scale, W.to(dot_dtype).contiguous(), bn


def _term_args(c: Tensor, w_dot: Tensor, bn: Tensor, ho: int, wo: int) -> list:
    return [c, *strides4(c), int(c.shape[1]), w_dot, bn, int(c.shape[2]) // ho, int(c.shape[3]) // wo]


def _apply(h: Tensor, terms: List[Tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """``h + sum`` of the terms; consecutive terms of one dtype share a launch (<= MAX_TERMS)."""
    N, C, HO, WO = (int(s) for s in h.shape)
    Q = N * HO * WO
    groups: List[List[Tuple[Tensor, Tensor, Tensor]]] = []
    for t in terms:
        if groups and len(groups[-1]) < MAX_TERMS and groups[-1][0][0].dtype == t[0].dtype:
            groups[-1].append(t)
        else:
            groups.append([t])
    base = h
    for group in groups:
        dt = group[0][0].dtype
        _, prec, upcast = dot_config(dt)
        block_c, block_q = pow2(C, 16, 64), pixel_block(Q, 64)
        block_k = pow2(max(int(t[0].shape[1]) for t in group), 16, 64)
        args: list = []
        for t in group + [group[0]] * (MAX_TERMS - len(group)):  # unused slots: never read
            args += _term_args(*t, HO, WO)
        out = torch.empty_like(h)
        launch(_ctx_apply_kernel, (triton.cdiv(Q, block_q), triton.cdiv(C, block_c)),
               base, *strides4(base), out, *strides4(out), C, HO, WO, Q, *args,
               NT=len(group), FP64=dt == torch.float64, H_FP64=h.dtype == torch.float64,
               BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_Q=block_q, PREC=prec, UPCAST=upcast)
        base = out
    return base


def _grad_sums(grad_out: Tensor, c: Tensor, w_dot: Tensor, bn: Tensor,
               center: Tensor) -> Tuple[Tensor, Tensor]:
    """``G = sum dz (c - center)^T`` (C, C_r) and ``D = sum dz`` (C,) of one term, pool
    factor included."""
    N, C, HO, WO = (int(s) for s in grad_out.shape)
    CR = int(c.shape[1])
    Q = N * HO * WO
    acc = acc_dtype(c.dtype)
    _, prec, upcast = dot_config(c.dtype)
    # 32 pixels per step for 4-byte operands and 64x64 tiles: at 64, fp32 (32|64, 32|64) tiles
    # spill 8-16 B on sm_90 and 16-bit 64x64 tiles 8 B on sm_80 (NCHW strides); the same
    # reads, in twice the steps
    block_c, block_k = pow2(C, 16, 64), pow2(CR, 16, 64)
    small_q = c.element_size() >= 4 or block_c * block_k >= 64 * 64
    block_q = pixel_block(Q, 32 if small_q else 64)
    ct, kt = triton.cdiv(C, block_c), triton.cdiv(CR, block_k)
    sh, sw = int(c.shape[2]) // HO, int(c.shape[3]) // WO
    meta = dict(FP64=acc == torch.float64, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_Q=block_q,
                PREC=prec, UPCAST=upcast,
                num_warps=_grad_warps(block_c, block_k, c.element_size() == 2 and c.stride(1) == 1))
    args = [grad_out, *strides4(grad_out), C, HO, WO, Q, block_q, c, *strides4(c), CR, w_dot, bn,
            center, sh, sw, acc, acc]  # acc: the partial buffers, allocated below
    G, D = launch_split_sums(_ctx_grad_kernel, args, meta, Q, block_q, (ct, kt), C, CR, acc,
                             c.device)
    inv_win = 1.0 / (sh * sw)
    return G * inv_win, D * inv_win


# ----------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------
def _residual_context_fwd(
    h: Tensor, contexts: List[Tensor], weights: List[Tensor], biases: List[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor], running_means: List[Tensor],
    running_vars: List[Tensor], training: bool, eps: float,
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Forward op: ``(out, means, vars, ctx_means, ctx_covs)``; ``weights`` are (C, C_r);
    ``running_means``/``running_vars`` are read only in eval (pass ``[]`` in training)."""
    means, vars_, ctx_means, ctx_covs, terms = [], [], [], [], []
    for r, c in enumerate(contexts):
        acc = acc_dtype(c.dtype)
        W, b = weights[r].to(acc), biases[r].to(acc)
        if training:
            m, cov = _context_moments(c)
            mean = W @ m + b
            var = ((W @ cov) * W).sum(1).clamp_min(0)
        else:
            m, cov = c.new_empty((0,), dtype=acc), c.new_empty((0,), dtype=acc)
            mean = running_means[r].to(acc, copy=True)
            var = running_vars[r].to(acc, copy=True)
        _, _, w_dot, bn = _fold_conv_bn(W, b, bn_weights[r], bn_biases[r], mean, var, eps,
                                        dot_config(c.dtype)[0])
        terms.append((c, w_dot, bn))
        means.append(mean)
        vars_.append(var)
        ctx_means.append(m)
        ctx_covs.append(cov)
    return _apply(h, terms), means, vars_, ctx_means, ctx_covs


def _residual_context_bwd(
    grad_out: Tensor, contexts: List[Tensor], weights: List[Tensor], biases: List[Tensor],
    bn_weights: List[Tensor], bn_biases: List[Tensor], means: List[Tensor], vars: List[Tensor],
    ctx_means: List[Tensor], ctx_covs: List[Tensor], training: bool, eps: float,
) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Backward op: ``(grad_weights (C, C_r), grad_biases, grad_bn_weights, grad_bn_biases)``."""
    gw, gb, gg, gbeta = [], [], [], []
    for r, c in enumerate(contexts):
        acc = acc_dtype(c.dtype)
        W, b = weights[r].to(acc), biases[r].to(acc)
        mean, var = means[r].to(acc), vars[r].to(acc)
        rstd, scale, w_dot, bn = _fold_conv_bn(W, b, bn_weights[r], bn_biases[r], mean, var,
                                               eps, dot_config(c.dtype)[0])
        if training:  # G is centred by the batch mean m of c, and mean = W m + b
            G, D = _grad_sums(grad_out, c, w_dot, bn, ctx_means[r].to(acc))
            dgamma = rstd * (W * G).sum(1)
            dW = scale[:, None] * (G - (dgamma * rstd)[:, None] * (W @ ctx_covs[r].to(acc)))
            db = torch.zeros_like(D)
        else:
            G, D = _grad_sums(grad_out, c, w_dot, bn, W.new_zeros(W.shape[1]))
            dgamma = rstd * ((W * G).sum(1) + (b - mean) * D)
            dW, db = scale[:, None] * G, scale * D
        gw.append(dW.to(weights[r].dtype))
        gb.append(db.to(biases[r].dtype))
        gg.append(dgamma.to(bn_weights[r].dtype))
        gbeta.append(D.to(bn_biases[r].dtype))
    return gw, gb, gg, gbeta


_fwd_op = define_op("residual_context", _residual_context_fwd)
_bwd_op = define_op("residual_context_backward", _residual_context_bwd)


def _setup_context(ctx, inputs, output):
    _, contexts, weights, biases, bn_weights, bn_biases, _, _, training, eps = inputs
    _, means, vars_, ctx_means, ctx_covs = output
    ctx.R, ctx.training, ctx.eps = len(contexts), training, eps
    ctx.save_for_backward(*contexts, *weights, *biases, *bn_weights, *bn_biases, *means, *vars_,
                          *ctx_means, *ctx_covs)


def _backward(ctx, grad_out, *_):
    R = ctx.R
    saved = ctx.saved_tensors
    lists = [list(saved[k * R:(k + 1) * R]) for k in range(9)]
    gw, gb, gg, gbeta = _bwd_op(grad_out, *lists, ctx.training, ctx.eps)
    none = [None] * R
    stats = [] if ctx.training else none  # the running statistics were passed only in eval
    return grad_out, none, gw, gb, gg, gbeta, stats, stats, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------
def residual_context(h, contexts, weights, biases, bn_weights, bn_biases, running_means,
                     running_vars, training, eps=1e-5):
    """Residual context terms of one ContSup boundary (arXiv 2312.07636, Sec. 3, Fig. 3):
    ``out = h + sum_r avgpool_{s_r}(relu(bn_r(conv1x1_r(c_r))))``.

    Same signature and results as
    :func:`contsup_fast.fused.reference.residual_context_ref`; BatchNorm as in Ioffe &
    Szegedy (2015), with batch statistics (biased variance) in training and the running
    statistics in eval; running buffers are never mutated.

    Args:
        h: (N, C, H, W) detached module output; fp32/bf16/fp16/fp64, any memory format.
        contexts: R >= 1 tensors ``c_r`` (N, C_r, s_r*H, s_r*W) (integer ``s_r``, may differ
            between height and width), detached (they receive no gradient).
        weights: conv1x1 weights (C, C_r, 1, 1) or (C, C_r); biases: (C,) or None.
        bn_weights, bn_biases: (C,) BatchNorm affine parameters (may be fp32 with 16-bit
            activations, as under autocast).
        running_means, running_vars: (C,) buffers, read only when ``training=False``.
        training: batch statistics (True) or running statistics (False).
        eps: BatchNorm epsilon.

    Returns:
        ``(out, means, vars)``: ``out`` (N, C, H, W) in ``h``'s dtype and memory format;
        per term the fp32 (fp64 for fp64 contexts) batch mean and biased variance of the conv
        output in training, or the running buffers themselves in eval.

    Saved for backward: the contexts (kept alive by the caller anyway), the parameters and
    per-term statistics (mean/var of ``y``, mean (C_r,) and covariance (C_r, C_r) of ``c``);
    no full-size intermediate. Gradients flow to weights, biases, bn_weights, bn_biases (and
    ``grad_out`` unchanged to ``h`` if it requires grad); the conv bias gradient is exactly 0
    in training (BatchNorm removes the bias).

    Raises:
        TypeError: a non-tensor argument.
        ValueError: wrong rank/shape/dtype/device (the message names the argument), a
            context whose spatial size is not an integer multiple of ``h``'s, sequences of
            unequal length, missing running statistics in eval, or a context that requires
            grad while grad mode is on.
    """
    check_tensor("h", h, 4)
    dev = h.device
    N, C, H, W = (int(s) for s in h.shape)
    names = ("contexts", "weights", "biases", "bn_weights", "bn_biases", "running_means",
             "running_vars")
    seqs = (contexts, weights, biases, bn_weights, bn_biases, running_means, running_vars)
    R = check_sequences(names, seqs)
    ws, bs = [], []
    for r in range(R):
        c = contexts[r]
        check_tensor(f"contexts[{r}]", c, 4, dev)
        if int(c.shape[0]) != N:
            raise ValueError(f"contexts[{r}] has batch size {c.shape[0]}, h has {N}; they must match")
        pool_factor(f"contexts[{r}]", c, (H, W), "h")
        if c.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"contexts[{r}] requires grad; stored contexts are detached and "
                             f"receive no gradient from this op: pass contexts[{r}].detach()")
        CR = int(c.shape[1])
        w = weights[r]
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{r}] must be a torch.Tensor, got {type(w).__name__}")
        if tuple(w.shape) not in ((C, CR), (C, CR, 1, 1)):
            raise ValueError(f"weights[{r}] must have shape ({C}, {CR}, 1, 1) or ({C}, {CR}) "
                             f"(C of h, C_r of contexts[{r}]), got {tuple(w.shape)}")
        if w.dtype not in FLOAT_DTYPES:
            raise ValueError(f"weights[{r}] has dtype {w.dtype}; allowed dtypes: float32, "
                             f"bfloat16, float16, float64")
        check_tensor(f"weights[{r}]", w, w.dim(), dev)
        ws.append(w.reshape(C, CR))
        if biases[r] is None:
            bs.append(torch.zeros(C, dtype=w.dtype, device=dev))
        else:
            check_vec(f"biases[{r}]", biases[r], C, dev)
            bs.append(biases[r])
        check_vec(f"bn_weights[{r}]", bn_weights[r], C, dev)
        check_vec(f"bn_biases[{r}]", bn_biases[r], C, dev)
        for nm, t in (("running_means", running_means[r]), ("running_vars", running_vars[r])):
            if t is None and not training:
                raise ValueError(f"{nm}[{r}] is None; it is required when training=False")
            if t is not None:
                check_vec(f"{nm}[{r}]", t, C, dev)
    running = ([], []) if training else (list(running_means), list(running_vars))
    out, means, vars_, _, _ = _fwd_op(h, list(contexts), ws, bs, list(bn_weights), list(bn_biases),
                                      *running, bool(training), float(eps))
    if not training:
        return out, list(running_means), list(running_vars)
    return out, means, vars_
