"""``image_context``: ``out = h + avgpool_s(relu(bn(conv3x3(u, W, b, padding=1))))``, the second
half of ContSup's image context encoder E (arXiv 2312.07636, Sec. 3, Fig. 3), fused so that the
full-resolution (N, C, s*H, s*W) convolution output ``y`` and its gradient never exist in memory,
forward or backward, training or eval.

Notation: ``u`` (N, C_in, HB, WB) with ``HB = sH*H``, ``WB = sW*W``; ``K9 = 9*C_in``; the
zero-padded 3x3 patch of big pixel ``p = (n, y, x)`` is the K9-vector ``x_p[k]`` with
``k = ci*9 + 3*dy + dx`` (the order of ``W.reshape(C, K9)``) and ``x_p[k] = u[n, ci, y+dy-1,
x+dx-1]`` (0 outside the image), so ``y_p = W x_p + b``; ``M = N*HB*WB``.

* statistics (training, ``_patch_gram_kernel``): one pass over ``u`` gathers the patch mean
  ``mu`` (K9,) and biased covariance ``S`` (K9, K9) (a Gram matrix of shifted patches, upper
  tiles only); ``mean_c = W_c . mu + b_c``, ``var_c = W_c^T S W_c``;
* apply (``_ic_apply_kernel``): per tile of pooled positions and channels, the conv is
  recomputed as an implicit GEMM (``W`` (C, K9) @ gathered patches (K9, tile)), BatchNorm
  folded to ``scale, shift``, ReLU, averaged over the ``sH x sW`` window, ``h`` added;
* backward sums (``_ic_grad_sums_kernel``): the same recompute gives the ReLU mask and
  ``dz = pool^T(grad_out) * [bn(y) > 0]``; one pass gathers ``D = sum dz`` and
  ``G = sum dz (x_p - center)^T`` (C, K9) (``center = mu`` in training, 0 in eval). The closed
  form (BatchNorm, Ioffe & Szegedy 2015; as in ``_residual.py``) is ``dbeta = D`` and
  train: ``dgamma = rstd*rowsum(W*G)``, ``dW = gamma*rstd*(G - dgamma*rstd*W S)``, ``db = 0``;
  eval: ``dgamma = rstd*(rowsum(W*G) + (b - mean) D)``, ``dW = gamma*rstd*G``,
  ``db = gamma*rstd*D``;
* grad_u (``_ic_grad_input_kernel``): ``grad_u = conv_transpose3x3(dy, W)`` with
  ``dy = k1*dz + k2*(y - b) + k3`` (per-channel ``k``). Persistent programs walk rectangular
  regions of the big image (``RH x RW`` pixels in ``LANES`` lanes); each recomputes ``dy`` on
  its region, writes it to a small per-program scratch (``LANES * C`` values, in L2 on a GPU),
  and forms ``grad_u`` on the region's interior (1-pixel halo) from 9 shifted reads of it.

The kernels are in ``kernels/_image_context_kernels.py``; this module plans their launches
(tiles, split counts, persistent grids), folds their partial sums (tiny torch math), defines
the ops and their autograd, and holds the cost model.
"""
from typing import Dict, Optional, Tuple

import torch
import triton
from torch import Tensor

from . import _common
from ._common import (INTERPRETED, _planned_for_gpu, acc_dtype, bn_fold, check_bn_args,
                      check_tensor, check_vec, define_op, dot_config, launch, launch_split_sums,
                      pixel_block, pool_factor, pow2, resident_programs, split_plan, strides4)
from ._image_context_kernels import (_ic_apply_kernel, _ic_grad_input_kernel, _ic_grad_sums_kernel,
                                     _patch_gram_kernel)


# ----------------------------------------------------------------------------------------
# launch helpers and finalize (tiny (C,) / (C, K9) / (K9, K9) torch math)
# ----------------------------------------------------------------------------------------
def _k_block(K9: int, acc: torch.dtype, cap: int = 128) -> int:
    """Tile over the 9*C_in patch rows (fp64 tiles: keep shared memory < 100 KB)."""
    return pow2(K9, 16, 32 if acc == torch.float64 else cap)


# GPU tiling, chosen so that ptxas (sm_90, Triton 3.8) reports no register spills at the real
# launches (python -m contsup_fast.kernels.compile_report); the interpreter's cost is per program and op, so
# there it takes fewer, larger tiles.
WARPS = 8
#: the apply kernel's (C, 64) tiles spill 8 B at 8 warps in fp32 (sm_90), not at 4
APPLY_WARPS = 4
#: K chunk (patch rows) of the implicit-GEMM conv recomputes (9*C_in = 108 pads to 112)
GPU_CONV_CHUNK = 16
#: pooled positions per step of the backward sums (a (C, 128) G tile stays in registers)
GPU_SUMS_Q = 16
#: channels per block and lanes per region of the grad_u kernel
GPU_GRAD_U_C, GPU_GRAD_U_LANES = 16, 128  # 256 lanes spill in fp32 on sm_90 (8 warps)
#: True: the tiles above (always on a GPU). The interpreter's cost is per program and per op,
#: so there it takes fewer, larger tiles unless a test sets this to True to run the GPU tiling
#: itself (tests/test_kernels_image_context.py::test_gpu_tiling_under_the_interpreter).
GPU_TILING = not INTERPRETED


def _conv_chunk() -> int:
    return GPU_CONV_CHUNK if GPU_TILING else 128


def patch_moments(u: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean ``mu`` (K9,) and biased covariance ``S`` (K9, K9) of the zero-padded 3x3 patches
    of ``u`` (N, C_in, HB, WB) over its N*HB*WB pixels (acc dtype), rows ordered like
    ``W.reshape(C, 9*C_in)``."""
    N, CI, HB, WB = (int(s) for s in u.shape)
    K9, P = 9 * CI, N * HB * WB
    acc = acc_dtype(u.dtype)
    shift = u.dtype in (torch.float32, torch.float64)  # 16-bit: exact products, no shift
    _, prec, upcast = dot_config(u.dtype, stats=True)
    # 32-row tiles on a GPU compute 10 of 16 tiles for 9*C_in = 108 (64-row: 3 of 4, 20%
    # more FLOPs); the interpreter's cost is per program, so it takes fewer, larger tiles
    block_k = _k_block(K9, acc, cap=32 if GPU_TILING else 64)
    block_p = pow2(P, 16, 32) if GPU_TILING else pixel_block(P, 32)
    kt = triton.cdiv(K9, block_k)
    piv = (u[0, :, 0, 0].to(acc).repeat_interleave(9) if shift
           else torch.zeros(K9, dtype=acc, device=u.device))
    meta = dict(SHIFT=shift, FP64=acc == torch.float64, BLOCK_K=block_k, BLOCK_P=block_p,
                PREC=prec, UPCAST=upcast, num_warps=WARPS)
    args = [u, *strides4(u), HB, WB, K9, P, block_p, piv, acc, acc]  # acc: buffers to come
    resident = resident_programs(_patch_gram_kernel, args, meta, u.device)
    splits, chunk = split_plan(P, block_p, kt * kt, u.device, resident)  # grid (splits, kt, kt)
    gram = torch.empty((splits, K9, K9), dtype=acc, device=u.device)
    sums = torch.empty((splits, K9), dtype=acc, device=u.device)
    args[9:] = [chunk, piv, gram, sums]
    launch(_patch_gram_kernel, (splits, kt, kt), *args, **meta)
    d = sums.sum(0) / P
    tile = torch.arange(K9, device=u.device) // block_k
    g = gram.sum(0)
    g = torch.where(tile[:, None] <= tile[None, :], g, g.transpose(0, 1))  # mirror lower tiles
    cov = g / P - d[:, None] * d[None, :]
    return piv + d, cov


def _apply(h: Tensor, u: Tensor, w_dot: Tensor, bn: Tensor) -> Tensor:
    N, C, HO, WO = (int(s) for s in h.shape)
    HB, WB = int(u.shape[2]), int(u.shape[3])
    K9, Q = 9 * int(u.shape[1]), N * HO * WO
    _, prec, upcast = dot_config(u.dtype)
    acc = acc_dtype(u.dtype)
    block_c, block_k = pow2(C, 16, 64), _k_block(K9, acc, _conv_chunk())
    block_q = pow2(Q, 16, 64) if GPU_TILING else pixel_block(Q, 64)
    out = torch.empty_like(h)
    launch(_ic_apply_kernel, (triton.cdiv(Q, block_q), triton.cdiv(C, block_c)),
           h, *strides4(h), out, *strides4(out), u, *strides4(u), HB, WB, K9, w_dot, bn,
           C, HO, WO, Q, HB // HO, WB // WO,
           FP64=acc == torch.float64, H_FP64=h.dtype == torch.float64, BLOCK_C=block_c,
           BLOCK_K=block_k, BLOCK_Q=block_q, PREC=prec, UPCAST=upcast, num_warps=APPLY_WARPS)
    return out


def _grad_sums(grad_out: Tensor, u: Tensor, w_dot: Tensor, bn: Tensor,
               center: Tensor) -> Tuple[Tensor, Tensor]:
    """``G = sum dz (x_p - center)^T`` (C, K9) and ``D = sum dz`` (C,), pool factor included."""
    N, C, HO, WO = (int(s) for s in grad_out.shape)
    HB, WB = int(u.shape[2]), int(u.shape[3])
    K9, Q = 9 * int(u.shape[1]), N * HO * WO
    acc = acc_dtype(u.dtype)
    _, prec, upcast = dot_config(u.dtype)
    block_c, block_k = pow2(C, 16, 64), _k_block(K9, acc)
    block_q = GPU_SUMS_Q if GPU_TILING else pixel_block(Q, 64)
    ct, kt = triton.cdiv(C, block_c), triton.cdiv(K9, block_k)
    sh, sw = HB // HO, WB // WO
    meta = dict(FP64=acc == torch.float64, BLOCK_C=block_c, BLOCK_K=block_k,
                BLOCK_KC=_k_block(K9, acc, _conv_chunk()), BLOCK_Q=block_q, PREC=prec,
                UPCAST=upcast, num_warps=WARPS)
    args = [grad_out, *strides4(grad_out), C, HO, WO, Q, block_q, u, *strides4(u), HB, WB, K9,
            w_dot, bn, center, sh, sw, acc, acc]  # acc: the partial buffers, allocated below
    G, D = launch_split_sums(_ic_grad_sums_kernel, args, meta, Q, block_q, (ct, kt), C, K9, acc,
                             u.device)
    inv_win = 1.0 / (sh * sw)
    return G * inv_win, D * inv_win


def region_plan(HB: int, WB: int, lanes: int) -> Tuple[int, int]:
    """Region ``(RH, RW)`` (halo included, ``RH*RW <= lanes``, both >= 3) that covers an
    ``HB x WB`` image with the fewest lanes in total."""
    best = None
    for rw in range(3, min(WB + 2, lanes // 3) + 1):
        rh = min(lanes // rw, HB + 2)
        cost = triton.cdiv(HB, rh - 2) * triton.cdiv(WB, rw - 2)
        if best is None or cost < best[0]:
            best = (cost, rh, rw)
    return best[1], best[2]


def _grad_input(grad_out: Tensor, u: Tensor, w_dot: Tensor, coef: Tensor) -> Tensor:
    N, C, HO, WO = (int(s) for s in grad_out.shape)
    _, CI, HB, WB = (int(s) for s in u.shape)
    K9 = 9 * CI
    acc = acc_dtype(u.dtype)
    _, prec, upcast = dot_config(u.dtype)
    if GPU_TILING:
        lanes = GPU_GRAD_U_LANES
    else:  # interpreter: cost per program and op: big regions, still several per image
        lanes = pow2(triton.cdiv((HB + 2) * (WB + 2), 2), 16, 1024)
    rh, rw = region_plan(HB, WB, lanes)
    tiles_w = triton.cdiv(WB, rw - 2)
    per_img = triton.cdiv(HB, rh - 2) * tiles_w
    tiles = N * per_img
    # channel blocks split the conv recompute (no extra FLOPs) and keep the register tiles small
    block_c = pow2(C, 16, GPU_GRAD_U_C if GPU_TILING else 64)
    block_k = _k_block(K9, acc, _conv_chunk())
    block_ci = pow2(CI, 16, 32)
    cit = triton.cdiv(CI, block_ci)
    meta = dict(FP64=acc == torch.float64, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_CI=block_ci,
                LANES=lanes, PREC=prec, UPCAST=upcast, num_warps=WARPS)
    grad_u = torch.empty_like(u)
    args = [grad_out, *strides4(grad_out), u, *strides4(u), CI, HB, WB, K9, w_dot, coef, C,
            HB // HO, WB // WO, grad_u, *strides4(grad_u), w_dot.dtype, tiles, tiles_w, per_img,
            rh, rw]  # w_dot.dtype: the scratch, allocated below
    # persistent programs: one wave of resident blocks (2 in the interpreter, to walk the loop)
    resident = resident_programs(_ic_grad_input_kernel, args, meta, u.device)
    if _common.RECORDER is not None:
        _common.RECORDER.pending = True
    programs = min(tiles, max(1, (resident if _planned_for_gpu(u.device) else 2) // cit))
    scratch = torch.empty((programs * cit, block_c, lanes), dtype=w_dot.dtype, device=u.device)
    args[24] = scratch
    launch(_ic_grad_input_kernel, (programs, cit), *args, **meta)
    return grad_u


def _fold(weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor,
          eps: float, u_dtype: torch.dtype):
    """``(W (C, K9) acc, b acc, rstd, scale, w_dot, bn)``: ``bn(conv(u)) = (W x)*scale + shift'``
    with ``bn = stack(scale, shift + b*scale)``; ``w_dot`` is W contiguous in the dot dtype
    (rounded like an autocast conv weight; the BatchNorm scale is applied after the dot)."""
    acc = acc_dtype(u_dtype)
    W = weight.reshape(weight.shape[0], -1).to(acc)
    b = bias.to(acc)
    rstd, scale, shift = bn_fold(gamma, beta, mean.to(acc), var.to(acc), eps, acc)
    w_dot = W.to(dot_config(u_dtype)[0]).contiguous()
    return W, b, rstd, scale, w_dot, torch.stack((scale, shift + b * scale))


# ----------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------
def _image_context_fwd(
    h: Tensor, u: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward op: ``(out, mean, var, patch_mean, patch_cov)`` (the last two empty in eval)."""
    acc = acc_dtype(u.dtype)
    W = weight.reshape(weight.shape[0], -1).to(acc)
    if training:
        mu, cov = patch_moments(u)
        mean = W @ mu + bias.to(acc)
        var = ((W @ cov) * W).sum(1).clamp_min(0)
    else:
        mu, cov = u.new_empty((0,), dtype=acc), u.new_empty((0,), dtype=acc)
        mean = running_mean.to(acc, copy=True)
        var = running_var.to(acc, copy=True)
    *_, w_dot, bn = _fold(weight, bias, bn_weight, bn_bias, mean, var, eps, u.dtype)
    return _apply(h, u, w_dot, bn), mean, var, mu, cov


def _image_context_bwd(
    grad_out: Tensor, u: Tensor, weight: Tensor, bias: Tensor, bn_weight: Tensor,
    bn_bias: Tensor, mean: Tensor, var: Tensor, patch_mean: Tensor, patch_cov: Tensor,
    training: bool, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward op: ``(grad_u, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias)``."""
    acc = acc_dtype(u.dtype)
    W, b, rstd, scale, w_dot, bn = _fold(weight, bias, bn_weight, bn_bias, mean, var, eps, u.dtype)
    mean, var = mean.to(acc), var.to(acc)
    sh = int(u.shape[2]) // int(grad_out.shape[2])
    sw = int(u.shape[3]) // int(grad_out.shape[3])
    M = int(u.shape[0]) * int(u.shape[2]) * int(u.shape[3])
    k1 = scale / (sh * sw)
    if training:  # G is centred by the patch mean mu, and mean = W mu + b
        G, D = _grad_sums(grad_out, u, w_dot, bn, patch_mean.to(acc))
        dgamma = rstd * (W * G).sum(1)
        dW = scale[:, None] * (G - (dgamma * rstd)[:, None] * (W @ patch_cov.to(acc)))
        db = torch.zeros_like(D)
        k2 = -scale * rstd * dgamma / M
        k3 = -scale * D / M - k2 * (mean - b)
    else:
        G, D = _grad_sums(grad_out, u, w_dot, bn, W.new_zeros(W.shape[1]))
        dgamma = rstd * ((W * G).sum(1) + (b - mean) * D)
        dW, db = scale[:, None] * G, scale * D
        k2, k3 = torch.zeros_like(k1), torch.zeros_like(k1)
    coef = torch.cat((bn, torch.stack((k1, k2, k3)))).contiguous()
    grad_u = _grad_input(grad_out, u, w_dot, coef)
    return (grad_u, dW.reshape(weight.shape).to(weight.dtype), db.to(bias.dtype),
            dgamma.to(bn_weight.dtype), D.to(bn_bias.dtype))


_fwd_op = define_op("image_context", _image_context_fwd)
_bwd_op = define_op("image_context_backward", _image_context_bwd)


def _setup_context(ctx, inputs, output):
    _, u, weight, bias, bn_weight, bn_bias, _, _, training, eps = inputs
    _, mean, var, mu, cov = output
    ctx.training, ctx.eps = training, eps
    ctx.save_for_backward(u, weight, bias, bn_weight, bn_bias, mean, var, mu, cov)


def _backward(ctx, grad_out, *_):
    grads = _bwd_op(grad_out, *ctx.saved_tensors, ctx.training, ctx.eps)
    return (grad_out, *grads, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# cost model (FLOPs and bytes, for bench/ and the README)
# ----------------------------------------------------------------------------------------
def cost_model(N: int, C: int, CI: int, HB: int, WB: int, HO: int, WO: int, itemsize: int,
               training: bool = True, lanes: int = GPU_GRAD_U_LANES) -> Dict[str, Dict[str, int]]:
    """FLOPs and DRAM bytes of one training (or eval) step of this op on a GPU, per pass, and
    of the eager E it replaces (``conv2d -> batch_norm -> relu -> adaptive_avg_pool2d -> add``
    and their backwards, op by op).

    Args: the shapes of ``h`` (N, C, HO, WO) and ``u`` (N, CI, HB, WB); ``itemsize`` the bytes
    of an activation (2 for bf16/fp16, 4 for fp32); ``lanes`` the grad_u region size.

    Returns ``{"<pass>": {"flops": ..., "bytes": ...}}`` with passes ``gram``, ``apply``,
    ``grad_sums``, ``grad_input`` (ours; ``gram`` only in training) and ``eager_forward``,
    ``eager_backward``, plus ``ours`` / ``eager`` totals and ``recompute_tail``, the path this
    op replaces (cuDNN conv + fused BN/ReLU/pool tail, conv recomputed in backward).
    The eager and ``recompute_tail`` bytes are those of training. FLOPs: 2 per multiply-add of the
    tensor-core dots as the GPU tiling executes them (padding of C to 16/64, of 9*C_in to the
    K tile, of C_in to 16, and the halo lanes of grad_u included); elementwise work is not
    counted (as ``torch.utils.flop_counter``, which counts the eager convolutions only).
    Bytes: compulsory DRAM traffic, every tensor argument read and every result written once
    per pass (re-reads of overlapping patches and halos assumed to hit in cache; the grad_u
    scratch, ``lanes * C`` values per program, stays in L2); the (C,)-sized vectors and
    weights are left out.
    """
    K9, P, Q = 9 * CI, N * HB * WB, N * HO * WO
    e = itemsize

    def padded(n, block):
        return triton.cdiv(n, block) * block

    cp = padded(C, pow2(C, 16, 64))
    conv = 2 * P * cp * padded(K9, pow2(K9, 16, GPU_CONV_CHUNK))  # one implicit-GEMM conv
    bk = pow2(K9, 16, 128)  # G tile of the backward sums
    bg = pow2(K9, 16, 32)
    kt = triton.cdiv(K9, bg)
    rh, rw = region_plan(HB, WB, lanes)
    lane_total = N * triton.cdiv(HB, rh - 2) * triton.cdiv(WB, rw - 2) * lanes
    bci = pow2(CI, 16, 32)
    cit = triton.cdiv(CI, bci)
    ours = {
        "apply": {"flops": conv, "bytes": e * (P * CI + 2 * Q * C)},
        "grad_sums": {"flops": conv * triton.cdiv(K9, bk) + 2 * P * cp * padded(K9, bk),
                      "bytes": e * (P * CI + Q * C)},
        "grad_input": {"flops": cit * 2 * lane_total * padded(C, pow2(C, 16, GPU_GRAD_U_C))
                       * (padded(K9, pow2(K9, 16, GPU_CONV_CHUNK)) + 9 * bci),
                       "bytes": e * (2 * P * CI + Q * C)},
    }
    if training:
        ours["gram"] = {"flops": 2 * P * bg * bg * kt * (kt + 1) // 2, "bytes": e * P * CI}
    eager_conv = 2 * P * C * K9
    pc, qc, pci = P * C, Q * C, P * CI
    # forward: conv (u -> y), batch_norm (stats + apply: 2 reads, 1 write), relu, pool, add
    fwd = pci + pc + 3 * pc + 2 * pc + (pc + qc) + 3 * qc
    # backward: pool (qc -> pc), relu (2 reads, 1 write), batch_norm (reduce: 2 reads; apply:
    # 2 reads, 1 write), conv dgrad (read grad_y, write grad_u), wgrad (read grad_y and u)
    bwd = (qc + pc) + 3 * pc + 5 * pc + (pc + pci) + (pc + pci)
    eager = {"eager_forward": {"flops": eager_conv, "bytes": e * fwd},
             "eager_backward": {"flops": 2 * eager_conv, "bytes": e * bwd}}
    # the torch path before this op (context._ImageContextRecompute): conv + fused tail
    # (stats, apply) in forward; conv recompute, fused tail backward (sums, grad_z), dgrad,
    # wgrad in backward
    today = {"flops": 4 * eager_conv,
             "bytes": e * ((pci + pc) + pc + (pc + 2 * qc)
                           + (pci + pc) + (pc + qc) + (2 * pc + qc) + (pc + pci) + (pc + pci))}
    out: Dict[str, Dict[str, int]] = {**ours, **eager}
    out["ours"] = {k: sum(v[k] for v in ours.values()) for k in ("flops", "bytes")}
    out["eager"] = {k: sum(v[k] for v in eager.values()) for k in ("flops", "bytes")}
    out["recompute_tail"] = today
    return out


# ----------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------
def image_context(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
                  eps=1e-5):
    """Second half of ContSup's image context encoder E fused with the boundary add
    (arXiv 2312.07636, Sec. 3, Fig. 3):
    ``out = h + avgpool_s(relu(bn(conv3x3(u, weight, bias, padding=1))))``, never
    materialising the (N, C, s*H, s*W) convolution output or its gradient.

    Same signature and results as :func:`contsup_fast.fused.reference.image_context_ref`;
    BatchNorm as in Ioffe & Szegedy (2015), batch statistics (biased variance) in training,
    running statistics in eval; running buffers are never mutated (fold the returned batch
    statistics in with :func:`contsup_fast.fused.reference.update_running_stats`).

    Args:
        h: (N, C, H, W) detached module output; fp32/bf16/fp16/fp64, any memory format.
        u: (N, C_in, sH*H, sW*W) hidden map of E (integer ``sH``, ``sW``); any memory format;
            receives gradient.
        weight: (C, C_in, 3, 3) conv weight; ``bias``: (C,) or None. Parameters may be fp32
            with 16-bit ``u`` (as under autocast; the weight is rounded to ``u``'s dtype for
            the tensor-core dots, like an autocast convolution).
        bn_weight, bn_bias: (C,) BatchNorm affine parameters.
        running_mean, running_var: (C,) buffers, required (and read) only when ``training=False``.
        training: batch statistics (True) or running statistics (False).
        eps: BatchNorm epsilon.

    Returns:
        ``(out, mean, var)``: ``out`` (N, C, H, W) in ``h``'s dtype and memory format; in
        training the fp32 (fp64 for fp64 ``u``) batch mean and biased variance of the conv
        output over (N, sH*H, sW*W), in eval the running buffers themselves.

    Saved for backward: ``u``, the parameters, the (C,) statistics and, in training, the
    patch mean (9*C_in,) and covariance (9*C_in, 9*C_in). Gradients flow to ``u``, ``weight``,
    ``bias``, ``bn_weight``, ``bn_bias`` (and ``grad_out`` unchanged to ``h`` if it requires
    grad); the bias gradient is exactly 0 in training (BatchNorm removes it).

    Raises:
        TypeError: a non-tensor argument.
        ValueError: wrong rank, shape, dtype or device (the message names the argument),
            ``u``'s spatial size not an integer multiple of ``h``'s, or missing running
            statistics in eval mode.
    """
    check_tensor("h", h, 4)
    dev = h.device
    N, C = int(h.shape[0]), int(h.shape[1])
    check_tensor("u", u, 4, dev)
    if int(u.shape[0]) != N:
        raise ValueError(f"u has batch size {u.shape[0]}, h has {N}; they must match")
    pool_factor("u", u, h.shape[-2:], "h")
    CI = int(u.shape[1])
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if tuple(weight.shape) != (C, CI, 3, 3):
        raise ValueError(f"weight must have shape ({C}, {CI}, 3, 3) (C of h, C_in of u), "
                         f"got {tuple(weight.shape)}")
    check_tensor("weight", weight, 4, dev)
    if bias is None:
        bias = torch.zeros(C, dtype=weight.dtype, device=dev)
    else:
        check_vec("bias", bias, C, dev)
    check_bn_args("", C, dev, bn_weight, bn_bias, running_mean, running_var, training)
    running = (None, None) if training else (running_mean, running_var)
    out, mean, var, _, _ = _fwd_op(h, u, weight, bias, bn_weight, bn_bias, *running,
                                   bool(training), float(eps))
    if not training:
        return out, running_mean, running_var
    return out, mean, var
