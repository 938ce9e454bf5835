// CUDA passes of the contsup_fast native backend, shared part: includes, the launch macro,
// index helpers, the register-tiled product helpers and the pixel partition of the tiled
// reductions, included by cuda_bn_pool.cu, cuda_residual_context.cu and
// cuda_image_context.cu (contract: contsup_ops.h; operator logic and formulas: op_*.cpp).
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
#pragma once

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
}  // namespace cuda
}  // namespace contsup
