// Shared declarations of the contsup_fast native backend (torch.ops.contsup.*).
//
// The operator-level code (op_*.cpp) is device-agnostic: it checks arguments,
// computes the small per-channel quantities (BatchNorm scale/shift, closed-form
// parameter gradients) with ATen ops on (C,)-sized tensors, and calls the heavy
// "passes" declared below. Each pass exists twice, in namespace contsup::cpu
// (cpu_*.cpp, at::parallel_for loops) and contsup::cuda (cuda_*.cu).
//
// Conventions of every pass:
//   * feature maps are 4-D (N, C, H, W) with ARBITRARY strides (contiguous,
//     channels_last, slices, expanded gradients with zero strides, ...);
//   * "acc" tensors (per-channel vectors/matrices) are contiguous, on the same
//     device, of dtype at::opmath_type<scalar_t> (fp32 for fp32/fp16/bf16, fp64 for fp64);
//   * pooling maps an input pixel (h, w) to the output pixel (h / sh, w / sw), i.e. an
//     exact sh x sw average pool (== adaptive_avg_pool2d when the sizes are multiples);
//   * reductions are deterministic: fixed partitions that depend only on the shapes,
//     partial sums combined in a fixed order (no atomics).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#if defined(__CUDACC__)
#define CONTSUP_HD __host__ __device__
#else
#define CONTSUP_HD
#endif

namespace contsup {

// Sizes and strides (in elements) of a 4-D tensor viewed as (N, C, H, W).
struct View4 {
  int64_t N, C, H, W;
  int64_t sN, sC, sH, sW;
};

inline View4 view4(const at::Tensor& t) {
  return View4{t.size(0),   t.size(1),   t.size(2),   t.size(3),
               t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// True when channels vary faster in memory than the width (channels_last-like);
// decides the loop order / thread mapping so that memory accesses stay contiguous.
CONTSUP_HD inline bool chan_inner(const View4& v) {
  return v.sC < v.sW || (v.sC == v.sW && v.C >= v.W);
}

#define CONTSUP_DECLARE_PASSES                                                             \
  /* sum over (N,H,W) of x (center undefined) or of (x - center)^2; returns (C,) acc */   \
  at::Tensor moments(const at::Tensor& x, const at::Tensor& center);                       \
  /* out = in + avgpool(act(A*z + B)); act = relu or identity; in may be undefined;     */ \
  /* out is an (N, C, Ho, Wo) tensor (or view) the pass writes into.                    */ \
  void pool_bn_relu(const at::Tensor& z, const at::Tensor& A, const at::Tensor& B,          \
                    const at::Tensor& in, const at::Tensor& out, bool relu);               \
  /* (2, C) acc: sum g_a and sum g_a * (z - mean), g_a = up(grad)/area * [A z + B > 0]   */ \
  at::Tensor pool_bwd_sums(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& A, \
                           const at::Tensor& B, const at::Tensor& mean);                   \
  /* dz = A*g_a - Q - (z - mean)*R, written into dz (same shape as z)                   */ \
  void pool_bwd_dz(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& A,         \
                   const at::Tensor& B, const at::Tensor& mean, const at::Tensor& Q,       \
                   const at::Tensor& R, const at::Tensor& dz);                             \
  /* (Cr, Cr) acc: sum over pixels of (c - mean)(c - mean)^T                             */ \
  at::Tensor comoment(const at::Tensor& c, const at::Tensor& mean);                        \
  /* out = in + avgpool(relu(Wt^T c + bp)); Wt (Cr, C) acc, bp (C,) acc                 */ \
  void residual_out(const at::Tensor& c, const at::Tensor& Wt, const at::Tensor& bp,        \
                    const at::Tensor& in, const at::Tensor& out);                          \
  /* (G (C, Cr), Sg (C,)): G = sum g_a (c - center)^T, Sg = sum g_a, with               */ \
  /* g_a = up(grad)/area * [Wt^T c + bp > 0]                                             */ \
  std::tuple<at::Tensor, at::Tensor> residual_bwd_sums(                                     \
      const at::Tensor& grad, const at::Tensor& c, const at::Tensor& Wt,                   \
      const at::Tensor& bp, const at::Tensor& center);                                     \
  /* Image context (3x3 conv, padding 1, of u (N, C_in, Hs, Ws)); patches x_p are the     */ \
  /* K = 9*C_in vectors x_p[j*9 + dy*3 + dx] = u[n, j, h+dy-1, w+dx-1] (0 outside).      */ \
  /* (K,) acc: sum over pixels of x_p                                                     */ \
  at::Tensor patch_sum(const at::Tensor& u);                                                \
  /* (K, K) acc: sum over pixels of (x_p - mean)(x_p - mean)^T                            */ \
  at::Tensor patch_comoment(const at::Tensor& u, const at::Tensor& mean);                   \
  /* out = in + avgpool(relu(A*z + B)), z_p = Wt^T x_p + b; Wt (K, C) acc, b, A, B (C,)   */ \
  void image_out(const at::Tensor& u, const at::Tensor& Wt, const at::Tensor& b,            \
                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& in,            \
                 const at::Tensor& out);                                                    \
  /* (G (C, K), Sg (C,)): G = sum g_a (x_p - center)^T, Sg = sum g_a, with                */ \
  /* g_a = up(grad)/area * [A z_p + B > 0]                                                 */ \
  std::tuple<at::Tensor, at::Tensor> image_bwd_sums(                                        \
      const at::Tensor& grad, const at::Tensor& u, const at::Tensor& Wt, const at::Tensor& b, \
      const at::Tensor& A, const at::Tensor& B, const at::Tensor& center);                  \
  /* du = conv3x3^T(dz) written into du (u's shape), dz_p = A*g_a - Q - (z_p - mean)*R,   */ \
  /* recomputed per tile (1-pixel halo); dz is never materialised                        */ \
  void image_bwd_du(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& Wt,      \
                    const at::Tensor& b, const at::Tensor& A, const at::Tensor& B,          \
                    const at::Tensor& mean, const at::Tensor& Q, const at::Tensor& R,       \
                    const at::Tensor& du);

namespace cpu {
CONTSUP_DECLARE_PASSES
}  // namespace cpu

#if defined(CONTSUP_WITH_CUDA) || defined(CONTSUP_CUDA_EMULATION)
namespace cuda {
CONTSUP_DECLARE_PASSES
}  // namespace cuda
#endif

}  // namespace contsup
