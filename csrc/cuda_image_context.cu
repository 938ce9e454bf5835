// CUDA passes of the image-context op (3x3 convolution with padding 1, never materialised):
// patch_sum, patch_comoment, image_out, image_bwd_sums, image_bwd_du (contract:
// contsup_ops.h), as register-tiled kernels reading patches on the fly.
#include "cuda_common.cuh"

namespace contsup {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------
// Image-context kernels: 3x3 convolution (padding 1) of u (N, C_in, Hs, Ws), never
// materialised. A patch x_p is the K = 9*C_in vector x_p[j*9 + dy*3 + dx] =
// u[n, j, h+dy-1, w+dx-1] (0 outside the image) -- weight.reshape(C, K)'s order. Staged
// pixels are described by (offset of u[n, 0, h, w], h, w, valid) in shared memory and
// their patch entries are read on the fly by patch_at (no im2col buffer).
// ------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t patch_at(const scalar_t* __restrict__ u, const View4& v, int64_t base, int h,
                                          int w, int64_t j) {
  const int ci = static_cast<int>(j / 9);
  const int o = static_cast<int>(j) - 9 * ci;
  const int dy = o / 3 - 1, dx = o - 3 * (o / 3) - 1;
  const int hh = h + dy, ww = w + dx;
  if (hh < 0 || hh >= v.H || ww < 0 || ww >= v.W) return acc_t(0);
  return static_cast<acc_t>(u[base + ci * v.sC + dy * v.sH + dx * v.sW]);
}

// Staged-pixel descriptors of NPIX pixels in shared memory.
template <int NPIX>
struct PixStage {
  int64_t base[NPIX];
  int h[NPIX], w[NPIX];
  bool valid[NPIX];
};

// Sets descriptor pl to pixel q = (n*Hs + h)*Ws + w of u (invalid when !ok).
template <int NPIX>
__device__ __forceinline__ void stage_pixel(PixStage<NPIX>& ps, int pl, const View4& v, bool ok, int64_t n,
                                            int64_t h, int64_t w) {
  ps.base[pl] = ok ? offset4(v, n, 0, h, w) : 0;
  ps.h[pl] = static_cast<int>(h);
  ps.w[pl] = static_cast<int>(w);
  ps.valid[pl] = ok;
}

// patch sums: partial[blockIdx.x][k] = sum over this block's pixels of x_p[k].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
patch_sum_kernel(const scalar_t* __restrict__ u, View4 v, Div divHW, Div divW, uint32_t P, uint32_t chunk,
                 acc_t* __restrict__ partial) {
  const int64_t K = 9 * v.C;
  const uint32_t q0 = blockIdx.x * chunk;
  const uint32_t q1 = min(q0 + chunk, P);
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    acc_t s = acc_t(0);
    for (uint32_t q = q0; q < q1; ++q) {
      const auto d1 = divHW.divmod(q);
      const auto d2 = divW.divmod(d1.mod);
      s += patch_at<scalar_t, acc_t>(u, v, offset4(v, d1.div, 0, d2.div, d2.mod), d2.div, d2.mod, k);
    }
    partial[static_cast<int64_t>(blockIdx.x) * K + k] = s;
  }
}

// Centred patch co-moment: partial[blockIdx.y][i][j] = sum over this block's pixels of
// (x_i - m_i)(x_j - m_j), for the (64 x 64) tile pair blockIdx.x of the K x K matrix.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
patch_comoment_kernel(const scalar_t* __restrict__ u, View4 v, const acc_t* __restrict__ mean, Div divHW,
                      Div divW, uint32_t P, uint32_t chunk, int ntile, acc_t* __restrict__ partial) {
  constexpr int LD = TI + 1;
  __shared__ acc_t xi[TQ * LD];
  __shared__ acc_t xj[TQ * LD];
  __shared__ PixStage<TQ> ps;
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t K = 9 * v.C;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x / ntile) * TI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x % ntile) * TI;
  const uint32_t q0 = blockIdx.y * chunk;
  const uint32_t q1 = min(q0 + chunk, P);
  acc_t acc[4][4];
  fill_tile(acc, acc_t(0));
  for (uint32_t qs = q0; qs < q1; qs += TQ) {
    if (t < TQ) {
      const uint32_t q = qs + t;
      const bool ok = q < q1;
      uint32_t n = 0, h = 0, w = 0;
      if (ok) {
        const auto d1 = divHW.divmod(q);
        const auto d2 = divW.divmod(d1.mod);
        n = d1.div; h = d2.div; w = d2.mod;
      }
      stage_pixel(ps, t, v, ok, n, h, w);
    }
    __syncthreads();
    for_each_staged<TQ, TI>(false, [&](int pl, int cl) {
      const int64_t ii = i0 + cl, jj = j0 + cl;
      acc_t vi = acc_t(0), vj = acc_t(0);
      if (ps.valid[pl]) {
        if (ii < K) vi = patch_at<scalar_t, acc_t>(u, v, ps.base[pl], ps.h[pl], ps.w[pl], ii) - mean[ii];
        if (jj < K) vj = patch_at<scalar_t, acc_t>(u, v, ps.base[pl], ps.h[pl], ps.w[pl], jj) - mean[jj];
      }
      xi[pl * LD + cl] = vi;
      xj[pl * LD + cl] = vj;
    });
    __syncthreads();
#pragma unroll 4
    for (int p = 0; p < TQ; ++p) fma_tile(acc, xi + p * LD, xj + p * LD, ty, tx);
    __syncthreads();
  }
  store_tile(partial + static_cast<int64_t>(blockIdx.y) * K * K, K, i0, K, j0, K, acc, ty, tx);
}

// Loads (A, B) of a thread's 4 output channels k0 + tx + 16a (0 past C).
template <typename acc_t>
__device__ __forceinline__ void load_affine4(acc_t (&Ak)[4], acc_t (&Bk)[4], const acc_t* __restrict__ A,
                                             const acc_t* __restrict__ B, int64_t k0, int tx, int64_t C) {
  load_bias4(Ak, A, k0, tx, C);
  load_bias4(Bk, B, k0, tx, C);
}

// Forward: out = in + avgpool(relu(A*(X W^T + b) + B)). Block = 64 output (pooled) pixels x
// 64 output channels; loops over the sh*sw window offsets, recomputing the convolution of
// the window's pixels in registers (tiled_xw over the K patch features).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
image_out_kernel(const scalar_t* __restrict__ u, View4 uv, const acc_t* __restrict__ Wt,
                 const acc_t* __restrict__ bias, const acc_t* __restrict__ A, const acc_t* __restrict__ B,
                 const scalar_t* in, View4 iv, scalar_t* out, View4 ov, int sh, int sw, acc_t inv, Div divWo,
                 Div divHo, uint32_t Po) {
  constexpr int CS_LD = TP + 1;
  constexpr int SMEM = TK * (TP + 1);
  static_assert(TJ * CS_LD + TJ * TK <= SMEM, "smem");
  __shared__ acc_t smem[SMEM];
  __shared__ PixStage<TP> ps;  // pixel (ho*sh, wo*sw) of each output pixel's window
  __shared__ int64_t ioff[TP], ooff[TP];
  acc_t* cs = smem;
  acc_t* ws = smem + TJ * CS_LD;
  acc_t* ot = smem;

  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t C = ov.C, K = 9 * uv.C;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * TK;
  const uint32_t p0 = blockIdx.x * TP;
  if (t < TP) {
    const uint32_t q = p0 + t;
    const bool ok = q < Po;
    int64_t n = 0, ho = 0, wo = 0;
    if (ok) {
      const auto a = divWo.divmod(q);
      const auto b = divHo.divmod(a.div);
      n = b.div; ho = b.mod; wo = a.mod;
    }
    stage_pixel(ps, t, uv, ok, n, ho * sh, wo * sw);
    ioff[t] = ok ? offset4(iv, n, 0, ho, wo) : 0;
    ooff[t] = ok ? offset4(ov, n, 0, ho, wo) : 0;
  }
  acc_t bk[4], Ak[4], Bk[4];
  load_bias4(bk, bias, k0, tx, C);
  load_affine4(Ak, Bk, A, B, k0, tx, C);
  acc_t pacc[4][4];
  fill_tile(pacc, acc_t(0));
  __syncthreads();

  for (int dy = 0; dy < sh; ++dy) {
    for (int dx = 0; dx < sw; ++dx) {
      const int64_t doff = dy * uv.sH + dx * uv.sW;
      acc_t y[4][4];
      tiled_xw<TP>(y, K, false, [&](int pl, int64_t j) {
        return ps.valid[pl] ? patch_at<scalar_t, acc_t>(u, uv, ps.base[pl] + doff, ps.h[pl] + dy, ps.w[pl] + dx, j)
                            : acc_t(0);
      }, Wt, k0, C, cs, ws);
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int a = 0; a < 4; ++a) pacc[b][a] += relu_(Ak[a] * (y[b][a] + bk[a]) + Bk[a]);
    }
  }
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
    if (ps.valid[pl] && k < C) {
      const acc_t base = static_cast<acc_t>(in[ioff[pl] + k * iv.sC]);
      out[ooff[pl] + k * ov.sC] = static_cast<scalar_t>(base + ot[kl * (TP + 1) + pl]);
    }
  }
}

// Backward sums for one (64 output channels) x (64 patch features) tile pair and one chunk
// of pixels: Gp[blockIdx.y][k][j] = sum_p g_a[p,k] (x_p[j] - center[j]),
// Sp[blockIdx.y][k] = sum_p g_a[p,k], g_a = grad[n,k,h/sh,w/sw]/(sh*sw) * [A_k z + B_k > 0],
// z recomputed per 32-pixel stage.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
image_bwd_sums_kernel(const scalar_t* __restrict__ g, View4 gv, const scalar_t* __restrict__ u, View4 uv,
                      const acc_t* __restrict__ Wt, const acc_t* __restrict__ bias, const acc_t* __restrict__ A,
                      const acc_t* __restrict__ B, const acc_t* __restrict__ center, int sh, int sw, acc_t inv,
                      Div divHW, Div divW, uint32_t P, uint32_t chunk, int jtiles, acc_t* __restrict__ Gp,
                      acc_t* __restrict__ Sp) {
  constexpr int CS_LD = TQ + 1, G_LD = TK + 1, XJ_LD = TI + 1;
  constexpr int STAGE_A = TJ * CS_LD + TJ * TK;
  constexpr int STAGE_B = TQ * XJ_LD;
  constexpr int UNION = STAGE_A > STAGE_B ? STAGE_A : STAGE_B;
  __shared__ acc_t smem[UNION];
  __shared__ acc_t gs[TQ * G_LD];
  __shared__ PixStage<TQ> ps;
  __shared__ int64_t goff[TQ];
  acc_t* cs = smem;
  acc_t* ws = smem + TJ * CS_LD;
  acc_t* xj = smem;

  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t K = 9 * uv.C, C = gv.C;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x / jtiles) * TK;
  const int jt = blockIdx.x % jtiles;
  const int64_t jb = static_cast<int64_t>(jt) * TI;
  const uint32_t q0 = blockIdx.y * chunk;
  const uint32_t q1 = min(q0 + chunk, P);
  const bool gcin = chan_inner(gv);

  acc_t bk[4], Ak[4], Bk[4];
  load_bias4(bk, bias, k0, tx, C);
  load_affine4(Ak, Bk, A, B, k0, tx, C);
  acc_t gacc[4][4];
  fill_tile(gacc, acc_t(0));
  acc_t sg = acc_t(0);

  for (uint32_t qs = q0; qs < q1; qs += TQ) {
    if (t < TQ) {
      const uint32_t q = qs + t;
      const bool ok = q < q1;
      uint32_t n = 0, h = 0, w = 0;
      if (ok) {
        const auto d1 = divHW.divmod(q);
        const auto d2 = divW.divmod(d1.mod);
        n = d1.div; h = d2.div; w = d2.mod;
      }
      stage_pixel(ps, t, uv, ok, n, h, w);
      goff[t] = ok ? offset4(gv, n, 0, h / sh, w / sw) : 0;
    }
    acc_t y[2][4];
    __syncthreads();
    tiled_xw<TQ>(y, K, false, [&](int pl, int64_t j) {
      return ps.valid[pl] ? patch_at<scalar_t, acc_t>(u, uv, ps.base[pl], ps.h[pl], ps.w[pl], j) : acc_t(0);
    }, Wt, k0, C, cs, ws);
    for_each_staged<TQ, TK>(gcin, [&](int pl, int kl) {
      const int64_t k = k0 + kl;
      acc_t val = acc_t(0);
      if (ps.valid[pl] && k < C) val = static_cast<acc_t>(g[goff[pl] + k * gv.sC]) * inv;
      gs[pl * G_LD + kl] = val;
    });
    for_each_staged<TQ, TI>(false, [&](int pl, int jl) {
      const int64_t j = jb + jl;
      acc_t val = acc_t(0);
      if (ps.valid[pl] && j < K) val = patch_at<scalar_t, acc_t>(u, uv, ps.base[pl], ps.h[pl], ps.w[pl], j) - center[j];
      xj[pl * XJ_LD + jl] = val;
    });
    __syncthreads();
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int a = 0; a < 4; ++a)
        if (!(Ak[a] * (y[b][a] + bk[a]) + Bk[a] > acc_t(0))) gs[(ty + 16 * b) * G_LD + tx + 16 * a] = acc_t(0);
    __syncthreads();
    if (jt == 0 && t < TK) {
      for (int p = 0; p < TQ; ++p) sg += gs[p * G_LD + t];
    }
#pragma unroll 4
    for (int p = 0; p < TQ; ++p) fma_tile(gacc, gs + p * G_LD, xj + p * XJ_LD, ty, tx);
    __syncthreads();
  }
  store_tile(Gp + static_cast<int64_t>(blockIdx.y) * C * K, K, k0, C, jb, K, gacc, ty, tx);
  if (jt == 0 && t < TK && k0 + t < C) Sp[static_cast<int64_t>(blockIdx.y) * C + k0 + t] = sg;
}

// grad_u of one DU_T x DU_T tile of u's pixels (all C_in channels): the block recomputes
// dz on the (DU_T + 2)^2 = 64 pixels around it (1-pixel halo; dz = 0 outside the image),
// 64 output channels at a time, stages dz in shared memory and applies the transposed
// convolution du[q, j] = sum_{k, dy, dx} W[k, j, dy, dx] dz[q - (dy-1, dx-1), k].
constexpr int DU_T = 6;
constexpr int DZ_T = DU_T + 2;  // 8 x 8 = 64 recomputed dz pixels
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
image_bwd_du_kernel(const scalar_t* __restrict__ g, View4 gv, const scalar_t* __restrict__ u, View4 uv,
                    scalar_t* __restrict__ du, View4 dv, const acc_t* __restrict__ Wt,
                    const acc_t* __restrict__ bias, const acc_t* __restrict__ A, const acc_t* __restrict__ B,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ Q, const acc_t* __restrict__ R,
                    int sh, int sw, acc_t inv, int tiles_h, int tiles_w) {
  constexpr int NP = DZ_T * DZ_T;  // 64
  constexpr int CS_LD = NP + 1, DZ_LD = TK + 1;
  constexpr int STAGE_A = TJ * CS_LD + TJ * TK;
  constexpr int STAGE_B = NP * DZ_LD;
  constexpr int UNION = STAGE_A > STAGE_B ? STAGE_A : STAGE_B;
  __shared__ acc_t smem[UNION];
  __shared__ PixStage<NP> ps;
  __shared__ int64_t goff[NP];
  acc_t* cs = smem;
  acc_t* ws = smem + TJ * CS_LD;
  acc_t* dzs = smem;  // [pixel][k]

  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t Ci = uv.C, K = 9 * Ci, C = gv.C;
  const int64_t n = blockIdx.x / (tiles_h * tiles_w);
  const int tile = blockIdx.x % (tiles_h * tiles_w);
  const int64_t y0 = static_cast<int64_t>(tile / tiles_w) * DU_T, x0 = static_cast<int64_t>(tile % tiles_w) * DU_T;
  if (t < NP) {
    const int64_t h = y0 - 1 + t / DZ_T, w = x0 - 1 + t % DZ_T;
    const bool ok = h >= 0 && h < uv.H && w >= 0 && w < uv.W;
    stage_pixel(ps, t, uv, ok, n, ok ? h : 0, ok ? w : 0);
    goff[t] = ok ? offset4(gv, n, 0, h / sh, w / sw) : 0;
  }
  // outputs of this thread: (pixel i, channel j) pairs e = t + 256 m of the DU_T^2 x C_in tile
  const int64_t nout = DU_T * DU_T * Ci;
  constexpr int MAXO = 4;  // C_in <= 4 * 256 / 36 = 28 per pass; larger C_in loops over passes
  __syncthreads();
  for (int64_t e0 = 0; e0 < nout; e0 += MAXO * kThreads) {
    acc_t dacc[MAXO];
#pragma unroll
    for (int m = 0; m < MAXO; ++m) dacc[m] = acc_t(0);
    for (int64_t k0 = 0; k0 < C; k0 += TK) {
      acc_t y[NP / 16][4];
      tiled_xw<NP>(y, K, false, [&](int pl, int64_t j) {
        return ps.valid[pl] ? patch_at<scalar_t, acc_t>(u, uv, ps.base[pl], ps.h[pl], ps.w[pl], j) : acc_t(0);
      }, Wt, k0, C, cs, ws);
      // dz = A g_a - Q - (z - mean) R  (thread owns pixels ty + 16b, channels k0 + tx + 16a)
#pragma unroll
      for (int b = 0; b < NP / 16; ++b) {
        const int pl = ty + 16 * b;
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const int64_t k = k0 + tx + 16 * a;
          acc_t d = acc_t(0);
          if (ps.valid[pl] && k < C) {
            const acc_t z = y[b][a] + bias[k];
            const acc_t ga = A[k] * z + B[k] > acc_t(0) ? static_cast<acc_t>(g[goff[pl] + k * gv.sC]) * inv : acc_t(0);
            d = A[k] * ga - Q[k] - (z - mean[k]) * R[k];
          }
          dzs[pl * DZ_LD + tx + 16 * a] = d;  // cs/ws are free: tiled_xw ends with a sync
        }
      }
      __syncthreads();
      const int64_t kn = C - k0 < TK ? C - k0 : TK;
#pragma unroll
      for (int m = 0; m < MAXO; ++m) {
        const int64_t e = e0 + t + static_cast<int64_t>(m) * kThreads;
        if (e >= nout) break;
        const int i = static_cast<int>(e / Ci);
        const int64_t j = e - i * Ci;
        const int qy = i / DU_T, qx = i % DU_T;
        acc_t s = acc_t(0);
        for (int o = 0; o < 9; ++o) {
          const int pl = (qy + 2 - o / 3) * DZ_T + (qx + 2 - o % 3);  // dz pixel q - (dy-1, dx-1)
          const acc_t* wrow = Wt + (j * 9 + o) * C + k0;
          const acc_t* drow = dzs + pl * DZ_LD;
          for (int64_t kl = 0; kl < kn; ++kl) s += wrow[kl] * drow[kl];
        }
        dacc[m] += s;
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < MAXO; ++m) {
      const int64_t e = e0 + t + static_cast<int64_t>(m) * kThreads;
      if (e >= nout) break;
      const int i = static_cast<int>(e / Ci);
      const int64_t j = e - i * Ci;
      const int64_t h = y0 + i / DU_T, w = x0 + i % DU_T;
      if (h < uv.H && w < uv.W) du[offset4(dv, n, j, h, w)] = static_cast<scalar_t>(dacc[m]);
    }
  }
}


}  // namespace

// ---- image context (see contsup_ops.h) ------------------------------------------------
Tensor patch_sum(const Tensor& u) {
  const View4 v = view4(u);
  const int64_t K = 9 * v.C, P = v.N * v.H * v.W;
  // fixed, shape-only partition: ~1024 pixel chunks of >= 64 pixels
  const int64_t chunk = std::max<int64_t>(64, ceil_div(P, 1024));
  const int64_t pblocks = ceil_div(P, chunk);
  Tensor partial = at::empty({pblocks, K}, u.options().dtype(acc_of(u)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_patch_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CONTSUP_LAUNCH(static_cast<unsigned>(pblocks), kThreads, patch_sum_kernel<scalar_t, acc_t>)(
        u.const_data_ptr<scalar_t>(), v, make_div(v.H * v.W), make_div(v.W), static_cast<uint32_t>(P),
        static_cast<uint32_t>(chunk), partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum(0).contiguous();
}

Tensor patch_comoment(const Tensor& u, const Tensor& mean) {
  const View4 v = view4(u);
  const int64_t K = 9 * v.C, P = v.N * v.H * v.W;
  const int64_t ntile = ceil_div(K, TI);
  const PixelPartition part = tiled_partition(P, ntile * ntile, K * K, "u (patch co-moment)");
  const int64_t chunk = part.chunk, pblocks = part.pblocks;
  Tensor partial = at::empty({pblocks, K, K}, u.options().dtype(acc_of(u)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_patch_comoment_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ntile * ntile), static_cast<unsigned>(pblocks));
    CONTSUP_LAUNCH(grid, kThreads, patch_comoment_kernel<scalar_t, acc_t>)(
        u.const_data_ptr<scalar_t>(), v, mean.const_data_ptr<acc_t>(), make_div(v.H * v.W), make_div(v.W),
        static_cast<uint32_t>(P), static_cast<uint32_t>(chunk), static_cast<int>(ntile),
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum(0).contiguous();
}

void image_out(const Tensor& u, const Tensor& Wt, const Tensor& b, const Tensor& A, const Tensor& B,
               const Tensor& in, const Tensor& out) {
  const View4 uv = view4(u), ov = view4(out), iv = view4(in);
  const int64_t sh = uv.H / ov.H, sw = uv.W / ov.W;
  const int64_t Po = ov.N * ov.H * ov.W;
  const int64_t ktiles = ceil_div(ov.C, TK);
  TORCH_CHECK(ktiles <= 65535, "contsup: too many output channels (", ov.C, ") for the CUDA kernel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_image_out_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ceil_div(Po, TP)), static_cast<unsigned>(ktiles));
    CONTSUP_LAUNCH(grid, kThreads, image_out_kernel<scalar_t, acc_t>)(
        u.const_data_ptr<scalar_t>(), uv, Wt.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
        A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), in.const_data_ptr<scalar_t>(), iv,
        out.mutable_data_ptr<scalar_t>(), ov, static_cast<int>(sh), static_cast<int>(sw),
        acc_t(1) / static_cast<acc_t>(sh * sw), make_div(ov.W), make_div(ov.H), static_cast<uint32_t>(Po));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor> image_bwd_sums(const Tensor& grad, const Tensor& u, const Tensor& Wt, const Tensor& b,
                                          const Tensor& A, const Tensor& B, const Tensor& center) {
  const View4 uv = view4(u), gv = view4(grad);
  const int64_t K = 9 * uv.C, C = gv.C, P = uv.N * uv.H * uv.W;
  const int64_t sh = uv.H / gv.H, sw = uv.W / gv.W;
  const int64_t ktiles = ceil_div(C, TK), jtiles = ceil_div(K, TI);
  const PixelPartition part = tiled_partition(P, ktiles * jtiles, C * K, "u (image-context backward)");
  const int64_t chunk = part.chunk, pblocks = part.pblocks;
  const auto opts = u.options().dtype(acc_of(u));
  Tensor Gp = at::empty({pblocks, C, K}, opts);
  Tensor Sp = at::empty({pblocks, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_image_bwd_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ktiles * jtiles), static_cast<unsigned>(pblocks));
    CONTSUP_LAUNCH(grid, kThreads, image_bwd_sums_kernel<scalar_t, acc_t>)(
        grad.const_data_ptr<scalar_t>(), gv, u.const_data_ptr<scalar_t>(), uv, Wt.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(),
        center.const_data_ptr<acc_t>(), static_cast<int>(sh), static_cast<int>(sw),
        acc_t(1) / static_cast<acc_t>(sh * sw), make_div(uv.H * uv.W), make_div(uv.W), static_cast<uint32_t>(P),
        static_cast<uint32_t>(chunk), static_cast<int>(jtiles), Gp.mutable_data_ptr<acc_t>(),
        Sp.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {Gp.sum(0), Sp.sum(0)};
}

void image_bwd_du(const Tensor& grad, const Tensor& u, const Tensor& Wt, const Tensor& b, const Tensor& A,
                  const Tensor& B, const Tensor& mean, const Tensor& Q, const Tensor& R, const Tensor& du) {
  const View4 uv = view4(u), gv = view4(grad), dv = view4(du);
  const int64_t sh = uv.H / gv.H, sw = uv.W / gv.W;
  const int64_t tiles_h = ceil_div(uv.H, DU_T), tiles_w = ceil_div(uv.W, DU_T);
  const int64_t blocks = uv.N * tiles_h * tiles_w;
  TORCH_CHECK(blocks <= INT32_MAX, "contsup: u too large for the CUDA image-context backward");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_image_bwd_du_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CONTSUP_LAUNCH(static_cast<unsigned>(blocks), kThreads, image_bwd_du_kernel<scalar_t, acc_t>)(
        grad.const_data_ptr<scalar_t>(), gv, u.const_data_ptr<scalar_t>(), uv, du.mutable_data_ptr<scalar_t>(), dv,
        Wt.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(),
        mean.const_data_ptr<acc_t>(), Q.const_data_ptr<acc_t>(), R.const_data_ptr<acc_t>(), static_cast<int>(sh),
        static_cast<int>(sw), acc_t(1) / static_cast<acc_t>(sh * sw), static_cast<int>(tiles_h),
        static_cast<int>(tiles_w));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace contsup
