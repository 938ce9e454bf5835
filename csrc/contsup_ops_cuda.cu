// CUDA passes of the contsup_fast native backend (see contsup_ops.h for the contract and
// contsup_ops.cpp for the operator logic and formulas).
//
// Design (H100-oriented, all accumulation in fp32 -- fp64 for fp64 tensors):
//   * element-wise / pooling kernels enumerate elements in the tensor's memory order
//     (channels fastest for channels_last, width fastest for NCHW) so global accesses
//     coalesce for both layouts; index decomposition uses multiply-shift dividers;
//   * per-channel reductions are two-stage and deterministic: blocks write partial sums
//     for a fixed, shape-dependent partition of the pixels; stage 2 is an ordered ATen sum
//     over the (small) partial buffer -- no atomics;
//   * the residual-context kernels never materialise the 1x1-conv output: a block stages
//     a tile of context pixels and of W' in shared memory, computes y = W'c + b' for a
//     64 x 64 (pixel x channel) tile in registers and fuses BN/ReLU/pooling (forward) or
//     the ReLU mask and the G = sum g_a c^T accumulation (backward) into the same pass.
//     The output pass reads c once, reads h once and writes out once (terms r > 0 of a
//     multi-term call accumulate into out); in training the BN statistics of y take two
//     more passes over c (channel means, then the centred C_r x C_r co-moment -- exact
//     centring instead of E[cc^T] - mm^T). The backward reads c and grad_out once per
//     64-wide tile of C_r (one pass for C_r <= 64), plus an ATen finalize on (C, C_r).
//   * every launch is checked with C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#if defined(CONTSUP_CUDA_EMULATION)
// test-only build: this file compiled as C++, kernels run on CPU threads (cuda_emulation.h)
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
// kernel launch on the current stream: CONTSUP_LAUNCH(grid, block, kernel<...>)(args...)
#define CONTSUP_LAUNCH(grid, block, ...) __VA_ARGS__<<<(grid), (block), 0, c10::cuda::getCurrentCUDAStream()>>>
#endif

#include <algorithm>
#include <cstdint>

#include "contsup_ops.h"

namespace contsup {
namespace cuda {
namespace {

using at::Tensor;
using Div = at::cuda::detail::IntDivider<unsigned int>;

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Div make_div(int64_t d) {
  TORCH_INTERNAL_ASSERT(d >= 1 && d <= INT32_MAX);
  return Div(static_cast<unsigned int>(d));
}

template <typename acc_t>
__device__ __forceinline__ acc_t relu_(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;  // NaN propagates like F.relu
}

__device__ __forceinline__ int64_t offset4(const View4& v, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * v.sN + c * v.sC + h * v.sH + w * v.sW;
}

// ------------------------------------------------------------------------------------
// Per-channel reduction over pixels q in [blockIdx.x*chunk, (blockIdx.x+1)*chunk) ∩ [0,P)
// of f(x[n, c, h, w]); writes partial[blockIdx.x][v][c] (NV values per channel).
// Thread mapping: channels_last-like -> 32 channels x 8 pixel lanes per block;
// otherwise one channel per block and 256 pixel lanes.
// ------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int NV, typename F>
__global__ void __launch_bounds__(kThreads)
channel_reduce_kernel(const scalar_t* __restrict__ x, View4 v, Div divHW, Div divW, uint32_t P,
                      uint32_t chunk, bool cin, F f, acc_t* __restrict__ partial) {
  __shared__ acc_t red[NV][kThreads];
  const int t = threadIdx.x;
  int64_t c;
  int lane, lanes;
  if (cin) {
    c = static_cast<int64_t>(blockIdx.y) * 32 + (t & 31);
    lane = t >> 5;
    lanes = kThreads / 32;
  } else {
    c = blockIdx.y;
    lane = t;
    lanes = kThreads;
  }
  const uint32_t q0 = blockIdx.x * chunk;
  const uint32_t q1 = min(q0 + chunk, P);
  acc_t acc[NV];
#pragma unroll
  for (int i = 0; i < NV; ++i) acc[i] = acc_t(0);
  if (c < v.C) {
    for (uint32_t q = q0 + lane; q < q1; q += lanes) {
      const auto d1 = divHW.divmod(q);
      const auto d2 = divW.divmod(d1.mod);
      const acc_t xv = static_cast<acc_t>(x[offset4(v, d1.div, c, d2.div, d2.mod)]);
      f(xv, d1.div, c, d2.div, d2.mod, acc);
    }
  }
#pragma unroll
  for (int i = 0; i < NV; ++i) red[i][t] = acc[i];
  __syncthreads();
  if (cin) {
    if (t < 32 && c < v.C) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        acc_t s = acc_t(0);
        for (int l = 0; l < kThreads / 32; ++l) s += red[i][l * 32 + t];
        partial[(static_cast<int64_t>(blockIdx.x) * NV + i) * v.C + c] = s;
      }
    }
  } else {
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (t < s) {
#pragma unroll
        for (int i = 0; i < NV; ++i) red[i][t] += red[i][t + s];
      }
      __syncthreads();
    }
    if (t == 0) {
#pragma unroll
      for (int i = 0; i < NV; ++i) partial[(static_cast<int64_t>(blockIdx.x) * NV + i) * v.C + c] = red[i][0];
    }
  }
}

template <typename acc_t>
struct SumF {
  __device__ void operator()(acc_t x, uint32_t, int64_t, uint32_t, uint32_t, acc_t (&a)[1]) const { a[0] += x; }
};

template <typename acc_t>
struct SqDevF {
  const acc_t* mean;
  __device__ void operator()(acc_t x, uint32_t, int64_t c, uint32_t, uint32_t, acc_t (&a)[1]) const {
    const acc_t d = x - mean[c];
    a[0] += d * d;
  }
};

template <typename acc_t>
struct AffineActF {
  const acc_t* A;
  const acc_t* B;
  bool relu;
  __device__ void operator()(acc_t x, uint32_t, int64_t c, uint32_t, uint32_t, acc_t (&a)[1]) const {
    const acc_t y = A[c] * x + B[c];
    a[0] += relu ? relu_(y) : y;
  }
};

template <typename scalar_t, typename acc_t>
struct BwdSumsF {
  const scalar_t* g;
  View4 gv;
  Div dsh, dsw;
  acc_t inv;
  const acc_t* A;
  const acc_t* B;
  const acc_t* mean;
  __device__ void operator()(acc_t x, uint32_t n, int64_t c, uint32_t h, uint32_t w, acc_t (&a)[2]) const {
    if (A[c] * x + B[c] > acc_t(0)) {
      const acc_t ga = static_cast<acc_t>(g[offset4(gv, n, c, dsh.div(h), dsw.div(w))]) * inv;
      a[0] += ga;
      a[1] += ga * (x - mean[c]);
    }
  }
};

// Launch a channel reduction; returns the partial buffer (blocks_p, NV, C).
// If per_sample, chunk = H*W so partial[n] is the reduction over sample n alone.
template <typename scalar_t, typename acc_t, int NV, typename F>
Tensor launch_channel_reduce(const Tensor& x, F f, bool per_sample) {
  const View4 v = view4(x);
  const int64_t P = v.N * v.H * v.W;
  const bool cin = chan_inner(v);
  const int64_t cblocks = cin ? ceil_div(v.C, 32) : v.C;
  TORCH_CHECK(cblocks <= 65535, "contsup: too many channels (", v.C, ") for the CUDA reduction");
  int64_t chunk;
  if (per_sample) {
    chunk = v.H * v.W;
  } else {
    // fixed, shape-only partition: ~1024 blocks in total, >= 256 pixels per block
    const int64_t pblocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(1024, cblocks), ceil_div(P, 256)));
    chunk = ceil_div(P, pblocks);
  }
  const int64_t pblocks = ceil_div(P, chunk);
  Tensor partial = at::empty({pblocks, NV, v.C}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const dim3 grid(static_cast<unsigned>(pblocks), static_cast<unsigned>(cblocks));
  CONTSUP_LAUNCH(grid, kThreads, channel_reduce_kernel<scalar_t, acc_t, NV, F>)(
      x.const_data_ptr<scalar_t>(), v, make_div(v.H * v.W), make_div(v.W), static_cast<uint32_t>(P),
      static_cast<uint32_t>(chunk), cin, f, partial.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

// Splits a memory-order element index e into (n, c, h, w): order (n, h, w, c) when cin, else (n, c, h, w).
__device__ __forceinline__ void split_index4(uint32_t e, const Div& d0, const Div& d1, const Div& d2, bool cin,
                                             uint32_t& n, uint32_t& c, uint32_t& h, uint32_t& w) {
  const auto a0 = d0.divmod(e);
  const auto a1 = d1.divmod(a0.div);
  const auto a2 = d2.divmod(a1.div);
  if (cin) {
    c = a0.mod; w = a1.mod; h = a2.mod; n = a2.div;
  } else {
    w = a0.mod; h = a1.mod; c = a2.mod; n = a2.div;
  }
}

// ------------------------------------------------------------------------------------
// out[n,c,ho,wo] = in[n,c,ho,wo] + (1/(sh*sw)) * sum_window act(A[c] z + B[c]);
// one thread per output element, enumerated in out's memory order.
// ------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
pool_window_kernel(const scalar_t* __restrict__ z, View4 zv, const acc_t* __restrict__ A,
                   const acc_t* __restrict__ B, bool relu, const scalar_t* in, View4 iv, scalar_t* out,
                   View4 ov, int sh, int sw, acc_t inv, Div d0, Div d1, Div d2, bool ocin, uint32_t total) {
  const uint32_t e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= total) return;
  uint32_t n, c, ho, wo;
  split_index4(e, d0, d1, d2, ocin, n, c, ho, wo);
  const acc_t Ac = A[c], Bc = B[c];
  const scalar_t* zp = z + offset4(zv, n, c, static_cast<int64_t>(ho) * sh, static_cast<int64_t>(wo) * sw);
  acc_t s = acc_t(0);
  for (int dy = 0; dy < sh; ++dy) {
    for (int dx = 0; dx < sw; ++dx) {
      const acc_t y = Ac * static_cast<acc_t>(zp[dy * zv.sH + dx * zv.sW]) + Bc;
      s += relu ? relu_(y) : y;
    }
  }
  s *= inv;
  if (in != nullptr) s += static_cast<acc_t>(in[offset4(iv, n, c, ho, wo)]);
  out[offset4(ov, n, c, ho, wo)] = static_cast<scalar_t>(s);
}

// dz = A*g_a - Q - (z - mean)*R,  g_a = grad[n,c,h/sh,w/sw]/(sh*sw) * [A z + B > 0];
// one thread per element of z, in z's memory order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
pool_bwd_dz_kernel(const scalar_t* __restrict__ g, View4 gv, const scalar_t* __restrict__ z, View4 zv,
                   scalar_t* __restrict__ dz, View4 dv, const acc_t* __restrict__ A,
                   const acc_t* __restrict__ B, const acc_t* __restrict__ mean,
                   const acc_t* __restrict__ Q, const acc_t* __restrict__ R, acc_t inv, Div d0, Div d1,
                   Div d2, Div dsh, Div dsw, bool cin, uint32_t total) {
  const uint32_t e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= total) return;
  uint32_t n, c, h, w;
  split_index4(e, d0, d1, d2, cin, n, c, h, w);
  const acc_t x = static_cast<acc_t>(z[offset4(zv, n, c, h, w)]);
  const acc_t Ac = A[c];
  acc_t ga = acc_t(0);
  if (Ac * x + B[c] > acc_t(0)) ga = static_cast<acc_t>(g[offset4(gv, n, c, dsh.div(h), dsw.div(w))]) * inv;
  dz[offset4(dv, n, c, h, w)] = static_cast<scalar_t>(Ac * ga - Q[c] - (x - mean[c]) * R[c]);
}

// ------------------------------------------------------------------------------------
// Tiled kernels of the residual-context op. 256 threads; (tx, ty) = (t % 16, t / 16).
// ------------------------------------------------------------------------------------
constexpr int TP = 64;  // output pixels per block (forward)
constexpr int TK = 64;  // output channels per block
constexpr int TJ = 32;  // context channels per shared-memory stage
constexpr int TQ = 32;  // context pixels per stage (backward / comoment)
constexpr int TI = 64;  // comoment tile / backward C_r tile

// Visits this thread's entries of an (NPIX pixels x NCH channels) staging tile in the source
// tensor's memory order (channels fastest when cin), calling f(pixel, channel) for each.
template <int NPIX, int NCH, typename F>
__device__ __forceinline__ void for_each_staged(bool cin, F f) {
#pragma unroll 2
  for (int i = 0; i < (NPIX * NCH) / kThreads; ++i) {
    const int e = threadIdx.x + kThreads * i;
    int cl, pl;
    if (cin) { cl = e % NCH; pl = e / NCH; } else { pl = e % NPIX; cl = e / NPIX; }
    f(pl, cl);
  }
}

// Sets every entry of a thread's (NB x 4) register tile to v.
template <int NB, typename acc_t>
__device__ __forceinline__ void fill_tile(acc_t (&x)[NB][4], acc_t v) {
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int a = 0; a < 4; ++a) x[b][a] = v;
}

// Register-blocked outer product: acc[b][a] += xs[ty + 16b] * ws[tx + 16a].
template <int NB, typename acc_t>
__device__ __forceinline__ void fma_tile(acc_t (&acc)[NB][4], const acc_t* xs, const acc_t* ws, int ty, int tx) {
  acc_t wv[4], xv[NB];
#pragma unroll
  for (int a = 0; a < 4; ++a) wv[a] = ws[tx + 16 * a];
#pragma unroll
  for (int b = 0; b < NB; ++b) xv[b] = xs[ty + 16 * b];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int a = 0; a < 4; ++a) acc[b][a] += xv[b] * wv[a];
}

// Stores a thread's 4x4 tile to row-major out (leading dim ld): row r0 + ty + 16b < nr, col c0 + tx + 16a < nc.
template <typename acc_t>
__device__ __forceinline__ void store_tile(acc_t* __restrict__ out, int64_t ld, int64_t r0, int64_t nr, int64_t c0,
                                           int64_t nc, const acc_t (&acc)[4][4], int ty, int tx) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int64_t r = r0 + ty + 16 * b;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t col = c0 + tx + 16 * a;
      if (r < nr && col < nc) out[r * ld + col] = acc[b][a];
    }
  }
}

// Loads the folded bias b'[k0 + tx + 16a] of a thread's 4 output channels (0 past C).
template <typename acc_t>
__device__ __forceinline__ void load_bias4(acc_t (&bk)[4], const acc_t* __restrict__ bp, int64_t k0, int tx, int64_t C) {
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t k = k0 + tx + 16 * a;
    bk[a] = k < C ? bp[k] : acc_t(0);
  }
}

// y = X W (no bias) for NPIX staged pixels (ty + 16b) x 64 output channels (k0 + tx + 16a),
// over the Kd input features in TJ-wide stages of X (cs: [TJ][NPIX + 1]) and of Wt (Kd, C)
// (ws: [TJ][TK]) in shared memory. load(pl, j) returns X[pixel pl][feature j] (0 for
// padding/invalid pixels; j < Kd); cin says whether consecutive features are adjacent in
// memory (staging order). Every thread must call it (it synchronises).
template <int NPIX, typename acc_t, typename Load>
__device__ __forceinline__ void tiled_xw(acc_t (&y)[NPIX / 16][4], int64_t Kd, bool cin, Load load,
                                         const acc_t* __restrict__ Wt, int64_t k0, int64_t C, acc_t* cs,
                                         acc_t* ws) {
  constexpr int CS_LD = NPIX + 1;  // padded (bank conflicts)
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  fill_tile(y, acc_t(0));
  for (int64_t j0 = 0; j0 < Kd; j0 += TJ) {
    for_each_staged<NPIX, TJ>(cin, [&](int pl, int jl) {
      const int64_t j = j0 + jl;
      cs[jl * CS_LD + pl] = j < Kd ? load(pl, j) : acc_t(0);
    });
#pragma unroll 2
    for (int i = 0; i < (TJ * TK) / kThreads; ++i) {
      const int e = t + kThreads * i;
      const int kl = e % TK, jl = e / TK;
      const int64_t j = j0 + jl, k = k0 + kl;
      ws[jl * TK + kl] = (j < Kd && k < C) ? Wt[j * C + k] : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int jl = 0; jl < TJ; ++jl) fma_tile(y, cs + jl * CS_LD, ws + jl * TK, ty, tx);
    __syncthreads();
  }
}

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

// pixel-chunk count for the tiled reductions: shape-only (deterministic), enough blocks
// to fill the GPU, partial buffers capped at ~4M elements
inline int64_t tiled_pblocks(int64_t P, int64_t tiles, int64_t partial_elems_per_block) {
  int64_t pb = std::max<int64_t>(1, ceil_div(512, tiles));
  pb = std::min<int64_t>(pb, ceil_div(P, 256));
  pb = std::min<int64_t>(pb, std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(partial_elems_per_block, 1)));
  return std::max<int64_t>(pb, 1);
}

// The pixel partition of a tiled reduction over P pixels with `tiles` output tiles: grid
// (tiles, pblocks), each y-block reducing `chunk` consecutive pixels into its own slice of a
// (pblocks, ...) partial buffer that the host then sums over dim 0.
struct PixelPartition {
  int64_t chunk, pblocks;
};

inline PixelPartition tiled_partition(int64_t P, int64_t tiles, int64_t partial_elems_per_block, const char* what) {
  const int64_t chunk = ceil_div(P, tiled_pblocks(P, tiles, partial_elems_per_block));
  const int64_t pblocks = ceil_div(P, chunk);
  TORCH_CHECK(pblocks <= 65535 && tiles <= INT32_MAX, "contsup: ", what, " too large for the CUDA kernel");
  return {chunk, pblocks};
}

inline at::ScalarType acc_of(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

// ------------------------------------------------------------------------------------
// Host entry points (see contsup_ops.h)
// ------------------------------------------------------------------------------------
Tensor moments(const Tensor& x, const Tensor& center) {
  Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "contsup_moments_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (center.defined()) {
      partial = launch_channel_reduce<scalar_t, acc_t, 1>(x, SqDevF<acc_t>{center.const_data_ptr<acc_t>()}, false);
    } else {
      partial = launch_channel_reduce<scalar_t, acc_t, 1>(x, SumF<acc_t>{}, false);
    }
  });
  return partial.sum(0).select(0, 0).contiguous();
}

void pool_bn_relu(const Tensor& z, const Tensor& A, const Tensor& B, const Tensor& in, const Tensor& out,
                  bool relu) {
  const View4 zv = view4(z), ov = view4(out);
  const int64_t sh = zv.H / ov.H, sw = zv.W / ov.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contsup_pool_bn_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* Ap = A.const_data_ptr<acc_t>();
    const acc_t* Bp = B.const_data_ptr<acc_t>();
    if (ov.H * ov.W == 1) {
      // global pooling: per-sample channel reduction (coalesced for both layouts)
      Tensor partial = launch_channel_reduce<scalar_t, acc_t, 1>(z, AffineActF<acc_t>{Ap, Bp, relu}, true);
      Tensor pooled = partial.select(1, 0).mul_(1.0 / static_cast<double>(zv.H * zv.W));  // (N, C)
      Tensor o2 = out.view({ov.N, ov.C});
      if (in.defined()) pooled.add_(in.reshape({ov.N, ov.C}));
      o2.copy_(pooled);
      return;
    }
    const int64_t total = ov.N * ov.C * ov.H * ov.W;
    const bool ocin = chan_inner(ov);
    const Div d0 = make_div(ocin ? ov.C : ov.W), d1 = make_div(ocin ? ov.W : ov.H),
              d2 = make_div(ocin ? ov.H : ov.C);
    const View4 iv = in.defined() ? view4(in) : ov;
    CONTSUP_LAUNCH(static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, pool_window_kernel<scalar_t, acc_t>)(
        z.const_data_ptr<scalar_t>(), zv, Ap, Bp, relu,
        in.defined() ? in.const_data_ptr<scalar_t>() : nullptr, iv, out.mutable_data_ptr<scalar_t>(), ov,
        static_cast<int>(sh), static_cast<int>(sw), acc_t(1) / static_cast<acc_t>(sh * sw), d0, d1, d2, ocin,
        static_cast<uint32_t>(total));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor pool_bwd_sums(const Tensor& grad, const Tensor& z, const Tensor& A, const Tensor& B, const Tensor& mean) {
  const View4 zv = view4(z), gv = view4(grad);
  const int64_t sh = zv.H / gv.H, sw = zv.W / gv.W;
  Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contsup_pool_bwd_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BwdSumsF<scalar_t, acc_t> f{grad.const_data_ptr<scalar_t>(), gv, make_div(sh), make_div(sw),
                                acc_t(1) / static_cast<acc_t>(sh * sw), A.const_data_ptr<acc_t>(),
                                B.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>()};
    partial = launch_channel_reduce<scalar_t, acc_t, 2>(z, f, false);
  });
  return partial.sum(0).contiguous();  // (2, C)
}

void pool_bwd_dz(const Tensor& grad, const Tensor& z, const Tensor& A, const Tensor& B, const Tensor& mean,
                 const Tensor& Q, const Tensor& R, const Tensor& dz) {
  const View4 zv = view4(z), gv = view4(grad), dv = view4(dz);
  const int64_t sh = zv.H / gv.H, sw = zv.W / gv.W;
  const int64_t total = zv.N * zv.C * zv.H * zv.W;
  const bool cin = chan_inner(zv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contsup_pool_bwd_dz_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CONTSUP_LAUNCH(static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, pool_bwd_dz_kernel<scalar_t, acc_t>)(
        grad.const_data_ptr<scalar_t>(), gv, z.const_data_ptr<scalar_t>(), zv, dz.mutable_data_ptr<scalar_t>(), dv,
        A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
        Q.const_data_ptr<acc_t>(), R.const_data_ptr<acc_t>(), acc_t(1) / static_cast<acc_t>(sh * sw),
        make_div(cin ? zv.C : zv.W), make_div(cin ? zv.W : zv.H), make_div(cin ? zv.H : zv.C), make_div(sh),
        make_div(sw), cin, static_cast<uint32_t>(total));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

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
