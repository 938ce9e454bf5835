// CUDA passes of the residual-context op (1x1 convolution, never materialised): comoment,
// residual_out, residual_bwd_sums (contract: contsup_ops.h), as register-tiled kernels.
#include "cuda_common.cuh"

namespace contsup {
namespace cuda {
namespace {

// y = W' c of the 1x1 convolution: pixel pl reads c[poff[pl] + doff + j * sC] when pvalid[pl].
template <int NPIX, typename scalar_t, typename acc_t>
__device__ __forceinline__ void tiled_wc(acc_t (&y)[NPIX / 16][4], const scalar_t* __restrict__ c, const View4& cv,
                                         bool cin, const int64_t* poff, const bool* pvalid, int64_t doff,
                                         const acc_t* __restrict__ Wt, int64_t k0, int64_t C, acc_t* cs, acc_t* ws) {
  tiled_xw<NPIX>(y, cv.C, cin, [&](int pl, int64_t j) {
    return pvalid[pl] ? static_cast<acc_t>(c[poff[pl] + doff + j * cv.sC]) : acc_t(0);
  }, Wt, k0, C, cs, ws);
}

// Forward: out = in + avgpool(relu(W' c + b')), W' given transposed as Wt (Cr, C).
// Block = (64 output pixels) x (64 output channels); loops over the sh*sw window offsets
// and over C_r in stages of 32. Thread owns pixels ty+16b and channels tx+16a (a,b<4).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
residual_out_kernel(const scalar_t* __restrict__ c, View4 cv, const acc_t* __restrict__ Wt,
                    const acc_t* __restrict__ bp, const scalar_t* in, View4 iv, scalar_t* out, View4 ov,
                    int sh, int sw, acc_t inv, Div divWo, Div divHo, uint32_t Po) {
  constexpr int CS_LD = TP + 1;                       // padded (bank conflicts)
  constexpr int SMEM = TK * (TP + 1);                 // >= TJ*CS_LD + TJ*TK
  static_assert(TJ * CS_LD + TJ * TK <= SMEM, "smem");
  __shared__ acc_t smem[SMEM];
  __shared__ int64_t coff[TP], ioff[TP], ooff[TP];
  __shared__ bool valid[TP];
  acc_t* cs = smem;                 // [TJ][CS_LD]   context values (j, pixel)
  acc_t* ws = smem + TJ * CS_LD;    // [TJ][TK]      W' (j, k)
  acc_t* ot = smem;                 // [TK][TP + 1]  epilogue tile (k, pixel)

  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t C = ov.C;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * TK;
  const uint32_t p0 = blockIdx.x * TP;
  if (t < TP) {
    const uint32_t q = p0 + t;
    const bool ok = q < Po;
    int64_t co = 0, io = 0, oo = 0;
    if (ok) {
      const auto a = divWo.divmod(q);
      const auto b = divHo.divmod(a.div);
      const int64_t n = b.div, ho = b.mod, wo = a.mod;
      co = offset4(cv, n, 0, ho * sh, wo * sw);
      io = offset4(iv, n, 0, ho, wo);
      oo = offset4(ov, n, 0, ho, wo);
    }
    coff[t] = co; ioff[t] = io; ooff[t] = oo; valid[t] = ok;
  }
  acc_t bk[4];
  load_bias4(bk, bp, k0, tx, C);
  acc_t pacc[4][4];
  fill_tile(pacc, acc_t(0));
  const bool cin = chan_inner(cv);
  __syncthreads();

  for (int dy = 0; dy < sh; ++dy) {
    for (int dx = 0; dx < sw; ++dx) {
      const int64_t doff = dy * cv.sH + dx * cv.sW;
      acc_t y[4][4];
      tiled_wc<TP>(y, c, cv, cin, coff, valid, doff, Wt, k0, C, cs, ws);
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int a = 0; a < 4; ++a) pacc[b][a] += relu_(y[b][a] + bk[a]);
    }
  }
  // epilogue through shared memory so that the global writes follow out's memory order
#pragma unroll
  for (int b = 0; b < 4; ++b)
#pragma unroll
    for (int a = 0; a < 4; ++a) ot[(tx + 16 * a) * (TP + 1) + ty + 16 * b] = pacc[b][a] * inv;
  __syncthreads();
  const bool ocin = chan_inner(ov);
#pragma unroll 4
  for (int i = 0; i < (TK * TP) / kThreads; ++i) {
    const int e = t + kThreads * i;
    int kl, pl;
    if (ocin) { kl = e % TK; pl = e / TK; } else { pl = e % TP; kl = e / TP; }
    const int64_t k = k0 + kl;
    if (valid[pl] && k < C) {
      const acc_t base = static_cast<acc_t>(in[ioff[pl] + k * iv.sC]);
      out[ooff[pl] + k * ov.sC] = static_cast<scalar_t>(base + ot[kl * (TP + 1) + pl]);
    }
  }
}

// Centred co-moment of the contexts: partial[blockIdx.y][i][j] = sum over this block's
// pixels of (c_i - m_i)(c_j - m_j), for the (64 x 64) tile pair blockIdx.x.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
comoment_kernel(const scalar_t* __restrict__ c, View4 cv, const acc_t* __restrict__ mean, Div divHW,
                Div divW, uint32_t P, uint32_t chunk, int ntile, acc_t* __restrict__ partial) {
  constexpr int LD = TI + 1;
  __shared__ acc_t ci[TQ * LD];
  __shared__ acc_t cj[TQ * LD];
  __shared__ int64_t poff[TQ];
  __shared__ bool pvalid[TQ];
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t Cr = cv.C;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x / ntile) * TI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x % ntile) * TI;
  const uint32_t q0 = blockIdx.y * chunk;
  const uint32_t q1 = min(q0 + chunk, P);
  const bool cin = chan_inner(cv);
  acc_t acc[4][4];
  fill_tile(acc, acc_t(0));
  for (uint32_t qs = q0; qs < q1; qs += TQ) {
    if (t < TQ) {
      const uint32_t q = qs + t;
      const bool ok = q < q1;
      int64_t o = 0;
      if (ok) {
        const auto d1 = divHW.divmod(q);
        const auto d2 = divW.divmod(d1.mod);
        o = offset4(cv, d1.div, 0, d2.div, d2.mod);
      }
      poff[t] = o;
      pvalid[t] = ok;
    }
    __syncthreads();
    for_each_staged<TQ, TI>(cin, [&](int pl, int cl) {
      const int64_t ii = i0 + cl, jj = j0 + cl;
      acc_t vi = acc_t(0), vj = acc_t(0);
      if (pvalid[pl]) {
        if (ii < Cr) vi = static_cast<acc_t>(c[poff[pl] + ii * cv.sC]) - mean[ii];
        if (jj < Cr) vj = static_cast<acc_t>(c[poff[pl] + jj * cv.sC]) - mean[jj];
      }
      ci[pl * LD + cl] = vi;
      cj[pl * LD + cl] = vj;
    });
    __syncthreads();
#pragma unroll 4
    for (int p = 0; p < TQ; ++p) fma_tile(acc, ci + p * LD, cj + p * LD, ty, tx);
    __syncthreads();
  }
  store_tile(partial + static_cast<int64_t>(blockIdx.y) * Cr * Cr, Cr, i0, Cr, j0, Cr, acc, ty, tx);
}

// Backward sums of the residual-context op for one (64 output channels) x (64 context
// channels) tile pair and one chunk of context pixels:
//   Gp[blockIdx.y][k][j] = sum_p g_a[p,k] (c[p,j] - center[j]),  Sp[blockIdx.y][k] = sum_p g_a[p,k]
// with g_a = grad[n,k,h/sh,w/sw]/(sh*sw) * [W'_k c_p + b'_k > 0] recomputed per 32-pixel stage.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
residual_bwd_kernel(const scalar_t* __restrict__ g, View4 gv, const scalar_t* __restrict__ c, View4 cv,
                    const acc_t* __restrict__ Wt, const acc_t* __restrict__ bp,
                    const acc_t* __restrict__ center, int sh, int sw, acc_t inv, Div divHW, Div divW,
                    uint32_t P, uint32_t chunk, int jtiles, acc_t* __restrict__ Gp, acc_t* __restrict__ Sp) {
  constexpr int CS_LD = TQ + 1, G_LD = TK + 1, CJ_LD = TI + 1;
  constexpr int STAGE_A = TJ * CS_LD + TJ * TK;  // cs + ws (y computation)
  constexpr int STAGE_B = TQ * CJ_LD;            // centred context tile (G accumulation)
  constexpr int UNION = STAGE_A > STAGE_B ? STAGE_A : STAGE_B;
  __shared__ acc_t smem[UNION];
  __shared__ acc_t gs[TQ * G_LD];  // g_a tile (pixel, k)
  __shared__ int64_t poff[TQ], goff[TQ];
  __shared__ bool pvalid[TQ];
  acc_t* cs = smem;               // [TJ][CS_LD]
  acc_t* ws = smem + TJ * CS_LD;  // [TJ][TK]
  acc_t* cj = smem;               // [TQ][CJ_LD]

  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t Cr = cv.C, C = gv.C;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x / jtiles) * TK;
  const int jt = blockIdx.x % jtiles;
  const int64_t jb = static_cast<int64_t>(jt) * TI;
  const uint32_t q0 = blockIdx.y * chunk;
  const uint32_t q1 = min(q0 + chunk, P);
  const bool cin = chan_inner(cv), gcin = chan_inner(gv);

  acc_t bk[4];
  load_bias4(bk, bp, k0, tx, C);
  acc_t gacc[4][4];
  fill_tile(gacc, acc_t(0));
  acc_t sg = acc_t(0);

  for (uint32_t qs = q0; qs < q1; qs += TQ) {
    if (t < TQ) {
      const uint32_t q = qs + t;
      const bool ok = q < q1;
      int64_t co = 0, go = 0;
      if (ok) {
        const auto d1 = divHW.divmod(q);
        const auto d2 = divW.divmod(d1.mod);
        const int64_t n = d1.div, h = d2.div, w = d2.mod;
        co = offset4(cv, n, 0, h, w);
        go = offset4(gv, n, 0, h / sh, w / sw);
      }
      poff[t] = co; goff[t] = go; pvalid[t] = ok;
    }
    // y = W' c + b' for this stage's 32 pixels (ty + 16b, b < 2) x 64 channels (tx + 16a)
    acc_t y[2][4];
    __syncthreads();
    tiled_wc<TQ>(y, c, cv, cin, poff, pvalid, 0, Wt, k0, C, cs, ws);
    // upstream gradient tile, loaded in grad's memory order
    for_each_staged<TQ, TK>(gcin, [&](int pl, int kl) {
      const int64_t k = k0 + kl;
      acc_t val = acc_t(0);
      if (pvalid[pl] && k < C) val = static_cast<acc_t>(g[goff[pl] + k * gv.sC]) * inv;
      gs[pl * G_LD + kl] = val;
    });
    // centred context tile for this block's C_r tile (cs/ws are free after the sync above)
    for_each_staged<TQ, TI>(cin, [&](int pl, int jl) {
      const int64_t j = jb + jl;
      acc_t val = acc_t(0);
      if (pvalid[pl] && j < Cr) val = static_cast<acc_t>(c[poff[pl] + j * cv.sC]) - center[j];
      cj[pl * CJ_LD + jl] = val;
    });
    __syncthreads();
    // ReLU mask: each thread owns the (pixel, channel) entries it computed y for
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int a = 0; a < 4; ++a)
        if (!(y[b][a] + bk[a] > acc_t(0))) gs[(ty + 16 * b) * G_LD + tx + 16 * a] = acc_t(0);
    __syncthreads();
    if (jt == 0 && t < TK) {
      for (int p = 0; p < TQ; ++p) sg += gs[p * G_LD + t];
    }
    // G tile: thread owns channels k = ty + 16b and context channels j = tx + 16a
#pragma unroll 4
    for (int p = 0; p < TQ; ++p) fma_tile(gacc, gs + p * G_LD, cj + p * CJ_LD, ty, tx);
    __syncthreads();
  }
  store_tile(Gp + static_cast<int64_t>(blockIdx.y) * C * Cr, Cr, k0, C, jb, Cr, gacc, ty, tx);
  if (jt == 0 && t < TK && k0 + t < C) Sp[static_cast<int64_t>(blockIdx.y) * C + k0 + t] = sg;
}

}  // namespace

Tensor comoment(const Tensor& c, const Tensor& mean) {
  const View4 cv = view4(c);
  const int64_t Cr = cv.C, P = cv.N * cv.H * cv.W;
  const int64_t ntile = ceil_div(Cr, TI);
  const PixelPartition part = tiled_partition(P, ntile * ntile, Cr * Cr, "context (comoment)");
  const int64_t chunk = part.chunk, pblocks = part.pblocks;
  Tensor partial = at::empty({pblocks, Cr, Cr}, c.options().dtype(acc_of(c)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "contsup_comoment_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ntile * ntile), static_cast<unsigned>(pblocks));
    CONTSUP_LAUNCH(grid, kThreads, comoment_kernel<scalar_t, acc_t>)(
        c.const_data_ptr<scalar_t>(), cv, mean.const_data_ptr<acc_t>(), make_div(cv.H * cv.W), make_div(cv.W),
        static_cast<uint32_t>(P), static_cast<uint32_t>(chunk), static_cast<int>(ntile),
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum(0).contiguous();
}

void residual_out(const Tensor& c, const Tensor& Wt, const Tensor& bp, const Tensor& in, const Tensor& out) {
  const View4 cv = view4(c), ov = view4(out), iv = view4(in);
  const int64_t sh = cv.H / ov.H, sw = cv.W / ov.W;
  const int64_t Po = ov.N * ov.H * ov.W;
  const int64_t ktiles = ceil_div(ov.C, TK);
  TORCH_CHECK(ktiles <= 65535, "contsup: too many output channels (", ov.C, ") for the CUDA kernel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "contsup_residual_out_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ceil_div(Po, TP)), static_cast<unsigned>(ktiles));
    CONTSUP_LAUNCH(grid, kThreads, residual_out_kernel<scalar_t, acc_t>)(
        c.const_data_ptr<scalar_t>(), cv, Wt.const_data_ptr<acc_t>(), bp.const_data_ptr<acc_t>(),
        in.const_data_ptr<scalar_t>(), iv, out.mutable_data_ptr<scalar_t>(), ov, static_cast<int>(sh),
        static_cast<int>(sw), acc_t(1) / static_cast<acc_t>(sh * sw), make_div(ov.W), make_div(ov.H),
        static_cast<uint32_t>(Po));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor> residual_bwd_sums(const Tensor& grad, const Tensor& c, const Tensor& Wt,
                                             const Tensor& bp, const Tensor& center) {
  const View4 cv = view4(c), gv = view4(grad);
  const int64_t Cr = cv.C, C = gv.C, P = cv.N * cv.H * cv.W;
  const int64_t sh = cv.H / gv.H, sw = cv.W / gv.W;
  const int64_t ktiles = ceil_div(C, TK), jtiles = ceil_div(Cr, TI);
  const PixelPartition part = tiled_partition(P, ktiles * jtiles, C * Cr, "context (residual backward)");
  const int64_t chunk = part.chunk, pblocks = part.pblocks;
  const auto opts = c.options().dtype(acc_of(c));
  Tensor Gp = at::empty({pblocks, C, Cr}, opts);
  Tensor Sp = at::empty({pblocks, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "contsup_residual_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ktiles * jtiles), static_cast<unsigned>(pblocks));
    CONTSUP_LAUNCH(grid, kThreads, residual_bwd_kernel<scalar_t, acc_t>)(
        grad.const_data_ptr<scalar_t>(), gv, c.const_data_ptr<scalar_t>(), cv, Wt.const_data_ptr<acc_t>(),
        bp.const_data_ptr<acc_t>(), center.const_data_ptr<acc_t>(), static_cast<int>(sh), static_cast<int>(sw),
        acc_t(1) / static_cast<acc_t>(sh * sw), make_div(cv.H * cv.W), make_div(cv.W), static_cast<uint32_t>(P),
        static_cast<uint32_t>(chunk), static_cast<int>(jtiles), Gp.mutable_data_ptr<acc_t>(),
        Sp.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {Gp.sum(0), Sp.sum(0)};
}

}  // namespace cuda
}  // namespace contsup
