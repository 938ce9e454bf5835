"""The Triton kernels of ``image_context`` (``kernels/_image_context.py``, which plans their
launches and folds their partial sums): ``out = h + avgpool_s(relu(bn(conv3x3(u, W, b,
padding=1))))``, ContSup's image context encoder E's second half (arXiv 2312.07636, Sec. 3,
Fig. 3), with the (N, C, s*H, s*W) convolution output recomputed tile by tile, never stored.

Notation (``u``, ``K9``, the patches ``x_p``, ``M``) and the four passes: the docstring of
``kernels/_image_context.py``.
"""
import triton
import triton.language as tl

from ._common import add_base, chunk_block, chunk_bounds, mma, split_pixels, to_acc, zeros_acc


# ----------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def _patch_offsets(n, y, x, mp, k, K9, sN, sC, sH, sW, HB, WB):
    """Offsets (BLOCK_K, BLOCK_P) of the zero-padded 3x3 patches of the big pixels
    ``(n, y, x)`` (vectors, lanes ``mp`` valid): row ``k = ci*9 + 3*dy + dx`` addresses
    ``u[n, ci, y+dy-1, x+dx-1]``. Returns ``(off, inside, valid)``: ``valid`` = real row and
    lane, ``inside`` = valid and within the image (else the padded value 0)."""
    ci = k // 9
    t = k - ci * 9
    dy = t // 3
    dx = t - dy * 3
    yy = y[None, :] + (dy - 1)[:, None]
    xx = x[None, :] + (dx - 1)[:, None]
    valid = (k < K9)[:, None] & mp[None, :]
    inside = valid & (yy >= 0) & (yy < HB) & (xx >= 0) & (xx < WB)
    off = n[None, :] * sN + ci[:, None] * sC + yy * sH + xx * sW
    return off, inside, valid


@triton.jit
def _conv_tile(u_ptr, n, y, x, mp, sN, sC, sH, sW, HB, WB, K9, w_ptr, co, mc, acc,
               BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + W[co, :] @ x_p`` for the lanes ``p = (n, y, x)``: the conv3x3 output without
    bias, a (BLOCK_C, BLOCK_P) tile (implicit GEMM over K9 in BLOCK_K chunks); ``w_ptr`` is
    W (C, K9) contiguous in the dot dtype."""
    for k0 in range(0, K9, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        off, inside, _ = _patch_offsets(n, y, x, mp, k, K9, sN, sC, sH, sW, HB, WB)
        xt = tl.load(u_ptr + off, mask=inside, other=0)
        wt = tl.load(w_ptr + co[:, None] * K9 + k[None, :], mask=mc[:, None] & (k < K9)[None, :],
                     other=0)
        acc = mma(wt, xt, acc, PREC, UPCAST)
    return acc


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _patch_gram_kernel(
    u_ptr, sN, sC, sH, sW, HB, WB, K9, P, CHUNK, piv_ptr, gram_ptr, sum_ptr,
    SHIFT: tl.constexpr, FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial Gram matrix ``sum_p x_p x_p^T`` (tile (ti, tj), ti <= tj only) and patch sums
    over the big pixels of split ``sp``; with ``SHIFT`` every patch is shifted by ``piv``
    (``u[0, ci, 0, 0]`` for each of its rows; the padded zeros too, so the covariance is
    unchanged)."""
    sp = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if tj >= ti:
        ki = ti * BLOCK_K + tl.arange(0, BLOCK_K)
        kj = tj * BLOCK_K + tl.arange(0, BLOCK_K)
        if SHIFT:
            piv_i = tl.load(piv_ptr + ki, mask=ki < K9, other=0)
            piv_j = tl.load(piv_ptr + kj, mask=kj < K9, other=0)
        acc = zeros_acc(BLOCK_K, BLOCK_K, FP64)
        s1 = tl.sum(zeros_acc(BLOCK_K, BLOCK_P, FP64), 1)
        start, end = chunk_bounds(sp, CHUNK, P)
        for p0 in range(start, end, BLOCK_P):
            mp, n, y, x = chunk_block(p0, end, HB * WB, WB, BLOCK_P)
            off_i, in_i, val_i = _patch_offsets(n, y, x, mp, ki, K9, sN, sC, sH, sW, HB, WB)
            off_j, in_j, val_j = _patch_offsets(n, y, x, mp, kj, K9, sN, sC, sH, sW, HB, WB)
            xi = tl.load(u_ptr + off_i, mask=in_i, other=0)
            xj = tl.load(u_ptr + off_j, mask=in_j, other=0)
            if SHIFT:
                xi = tl.where(val_i, to_acc(xi, FP64) - piv_i[:, None], 0.0)
                xj = tl.where(val_j, to_acc(xj, FP64) - piv_j[:, None], 0.0)
            acc = mma(xi, tl.trans(xj), acc, PREC, UPCAST)
            s1 += tl.sum(to_acc(xi, FP64), 1)
        tl.store(gram_ptr + sp * K9 * K9 + ki[:, None] * K9 + kj[None, :], acc,
                 mask=(ki < K9)[:, None] & (kj < K9)[None, :])
        if ti == tj:
            tl.store(sum_ptr + sp * K9 + ki, s1, mask=ki < K9)


@triton.jit
def _ic_apply_kernel(
    h_ptr, hN, hC, hH, hW, o_ptr, oN, oC, oH, oW, u_ptr, sN, sC, sH, sW, HB, WB, K9,
    w_ptr, bn_ptr, C, HO, WO, Q, SH, SW,
    FP64: tl.constexpr, H_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[n, c, i, j] = h + mean_{a<SH, b<SW} relu(conv(u)[n, c, i*SH+a, j*SW+b]*scale + shift);
    ``bn_ptr`` is the (2, C) folded BatchNorm (scale; shift + bias*scale)."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mq = q < Q
    mc = co < C
    n, i, j = split_pixels(q, HO * WO, WO)
    scale = tl.load(bn_ptr + co, mask=mc, other=0)[:, None]
    shift = tl.load(bn_ptr + C + co, mask=mc, other=0)[:, None]
    acc = zeros_acc(BLOCK_C, BLOCK_Q, FP64)
    for a in range(SH):
        for b in range(SW):
            y = _conv_tile(u_ptr, n, i * SH + a, j * SW + b, mq, sN, sC, sH, sW, HB, WB, K9,
                           w_ptr, co, mc, zeros_acc(BLOCK_C, BLOCK_Q, FP64), BLOCK_K, PREC, UPCAST)
            acc += tl.maximum(y * scale + shift, 0.0)
    m2 = mc[:, None] & mq[None, :]
    hv = tl.load(h_ptr + n[None, :] * hN + co[:, None] * hC + (i * hH + j * hW)[None, :], mask=m2)
    res = add_base(hv, acc / (SH * SW), FP64, H_FP64)  # not * (1.0/..): fp32 reciprocal
    o_off = n[None, :] * oN + co[:, None] * oC + (i * oH + j * oW)[None, :]
    tl.store(o_ptr + o_off, res.to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _ic_grad_sums_kernel(
    g_ptr, gN, gC, gH, gW, C, HO, WO, Q, QCHUNK,
    u_ptr, sN, sC, sH, sW, HB, WB, K9, w_ptr, bn_ptr, center_ptr, SH, SW, gpart_ptr, dpart_ptr,
    FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr,
    BLOCK_Q: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial ``G[co, k] = sum dz (x_p[k] - center[k])`` (tile (co, k)) and ``D[co] = sum dz``
    over the pooled positions of split ``sp``; ``dz = grad_out[pooled] * [bn(y) > 0]`` (the
    1/(SH*SW) of the pool is applied in the finalize)."""
    sp = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    kk = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mc = co < C
    scale = tl.load(bn_ptr + co, mask=mc, other=0)[:, None]
    shift = tl.load(bn_ptr + C + co, mask=mc, other=0)[:, None]
    center = tl.load(center_ptr + kk, mask=kk < K9, other=0)
    G = zeros_acc(BLOCK_C, BLOCK_K, FP64)
    D = tl.sum(zeros_acc(BLOCK_C, BLOCK_Q, FP64), 1)
    start, end = chunk_bounds(sp, QCHUNK, Q)
    for q0 in range(start, end, BLOCK_Q):
        mq, n, i, j = chunk_block(q0, end, HO * WO, WO, BLOCK_Q)
        g_off = n[None, :] * gN + co[:, None] * gC + (i * gH + j * gW)[None, :]
        g = to_acc(tl.load(g_ptr + g_off, mask=mc[:, None] & mq[None, :], other=0), FP64)
        for a in range(SH):
            for b in range(SW):
                yb = i * SH + a
                xb = j * SW + b
                y = _conv_tile(u_ptr, n, yb, xb, mq, sN, sC, sH, sW, HB, WB, K9, w_ptr, co, mc,
                               zeros_acc(BLOCK_C, BLOCK_Q, FP64), BLOCK_KC, PREC, UPCAST)
                dz = tl.where(y * scale + shift > 0, g, 0.0)
                D += tl.sum(dz, 1)
                off, inside, valid = _patch_offsets(n, yb, xb, mq, kk, K9, sN, sC, sH, sW, HB, WB)
                xk = tl.load(u_ptr + off, mask=inside, other=0)
                xc = tl.where(valid, to_acc(xk, FP64) - center[:, None], 0.0).to(xk.dtype)
                G = mma(dz.to(xk.dtype), tl.trans(xc), G, PREC, UPCAST)
    tl.store(gpart_ptr + sp * C * K9 + co[:, None] * K9 + kk[None, :], G,
             mask=mc[:, None] & (kk < K9)[None, :])
    if tl.program_id(2) == 0:
        tl.store(dpart_ptr + sp * C + co, D, mask=mc)


@triton.jit
def _ic_grad_input_kernel(
    g_ptr, gN, gC, gH, gW, u_ptr, sN, sC, sH, sW, CI, HB, WB, K9, w_ptr, coef_ptr, C, SH, SW,
    d_ptr, dN, dC, dH, dW, scratch_ptr, TILES, TILES_W, TILES_PER_IMG, RH, RW,
    FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CI: tl.constexpr,
    LANES: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """``grad_u = conv_transpose3x3(dy, W)`` over regions of ``RH x RW`` big pixels (lanes
    ``r < RH*RW``, origin one pixel above-left of the interior): ``dy = k1*dz + k2*y + k3``
    (``y`` without bias, ``dz = grad_out[pooled] * [y*scale + shift > 0]``, 0 outside the
    image) is recomputed on the region and staged in this program's scratch; the interior
    lanes then read it at the 9 tap offsets. ``coef_ptr`` is (5, C): scale, shift, k1, k2, k3."""
    pid = tl.program_id(0)
    cib = tl.program_id(1)
    ci = cib * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mci = ci < CI
    r = tl.arange(0, LANES)
    ry = r // RW
    rx = r - ry * RW
    lane = r < RH * RW
    interior = lane & (ry >= 1) & (ry < RH - 1) & (rx >= 1) & (rx < RW - 1)
    cl = tl.arange(0, BLOCK_C)
    scr = scratch_ptr + (pid * tl.num_programs(1) + cib) * (BLOCK_C * LANES)
    for t in range(pid, TILES, tl.num_programs(0)):
        n = t // TILES_PER_IMG
        rem = t - n * TILES_PER_IMG
        ty = rem // TILES_W
        tx = rem - ty * TILES_W
        yy = ty * (RH - 2) - 1 + ry
        xx = tx * (RW - 2) - 1 + rx
        inimg = lane & (yy >= 0) & (yy < HB) & (xx >= 0) & (xx < WB)
        nv = tl.zeros([LANES], tl.int64) + n
        du = zeros_acc(BLOCK_CI, LANES, FP64)
        for c0 in range(0, C, BLOCK_C):
            co = c0 + cl
            mc = co < C
            scale = tl.load(coef_ptr + co, mask=mc, other=0)[:, None]
            shift = tl.load(coef_ptr + C + co, mask=mc, other=0)[:, None]
            k1 = tl.load(coef_ptr + 2 * C + co, mask=mc, other=0)[:, None]
            k2 = tl.load(coef_ptr + 3 * C + co, mask=mc, other=0)[:, None]
            k3 = tl.load(coef_ptr + 4 * C + co, mask=mc, other=0)[:, None]
            y = _conv_tile(u_ptr, nv, yy, xx, inimg, sN, sC, sH, sW, HB, WB, K9, w_ptr, co, mc,
                           zeros_acc(BLOCK_C, LANES, FP64), BLOCK_K, PREC, UPCAST)
            m2 = mc[:, None] & inimg[None, :]
            g_pix = (yy // SH) * gH + (xx // SW) * gW
            g_off = nv[None, :] * gN + co[:, None] * gC + g_pix[None, :]
            g = to_acc(tl.load(g_ptr + g_off, mask=m2, other=0), FP64)
            dy = k1 * tl.where(y * scale + shift > 0, g, 0.0) + k2 * y + k3
            dy = tl.where(m2, dy, 0.0)
            tl.debug_barrier()  # every lane has read the previous contents of the scratch
            tl.store(scr + cl[:, None] * LANES + r[None, :], dy.to(scratch_ptr.dtype.element_ty))
            tl.debug_barrier()
            for tap in tl.static_range(9):
                src = (ry + 1 - tap // 3) * RW + (rx + 1 - tap % 3)
                dsh = tl.load(scr + cl[:, None] * LANES + src[None, :], mask=interior[None, :],
                              other=0)
                wt = tl.load(w_ptr + co[None, :] * K9 + ci[:, None] * 9 + tap,
                             mask=mci[:, None] & mc[None, :], other=0)
                du = mma(wt, dsh, du, PREC, UPCAST)
        store = mci[:, None] & (interior & inimg)[None, :]
        d_off = nv[None, :] * dN + ci[:, None] * dC + (yy * dH + xx * dW)[None, :]
        tl.store(d_ptr + d_off, du.to(d_ptr.dtype.element_ty), mask=store)
