// contsup_fast native backend: operator schemas, CPU kernels and the device-agnostic
// operator logic of the four fused "boundary" ops of ContSup (greedy local learning with
// context supply, arXiv 2312.07636, Sec. 3 / Fig. 3). The plain-PyTorch specification is
// contsup_fast/fused/reference.py; contsup_fast/_native.py registers fake (meta) kernels
// and autograd formulas for these ops and wraps them with the reference signatures.
//
// Notation (per BatchNorm channel k; Ioffe & Szegedy 2015):
//   training: mu, var = batch mean and *biased* variance over (N, H, W);
//   eval:     mu, var = running_mean, running_var;
//   rstd = 1/sqrt(var + eps), A = gamma*rstd, B = beta - mu*A, so bn(y) = A*y + B;
//   relu(bn(y)) is average-pooled by exact integer factors (sh, sw) to h's size.
// Backward of BN+ReLU with batch statistics, with g_a = dL/d(bn(y)) * [bn(y) > 0] and M the
// number of elements per channel:
//   dbeta = sum g_a,   dgamma = sum g_a*yhat,   dy = A*(g_a - dbeta/M - yhat*dgamma/M)
// (eval: dy = A*g_a). See the individual ops below for what each saves.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif
#include <cstring>
#include <vector>

#include "contsup_ops.h"

namespace contsup {

using at::Tensor;

// ------------------------------------------------------------------------------------
// CPU passes
// ------------------------------------------------------------------------------------
namespace cpu {
namespace {

constexpr int64_t kMaxGroups = 64;             // row groups of the deterministic reductions
constexpr int64_t kMaxPartialElems = 1 << 22;  // cap on partial-sum memory (elements)

// Copy row (n, h) of x into buf[w*C + c] (channel vectors contiguous), in acc precision.
template <typename scalar_t, typename acc_t>
inline void gather_row(const scalar_t* x, const View4& v, int64_t n, int64_t h, acc_t* buf) {
  const scalar_t* p = x + n * v.sN + h * v.sH;
  if (chan_inner(v)) {
    for (int64_t w = 0; w < v.W; ++w) {
      const scalar_t* q = p + w * v.sW;
      acc_t* b = buf + w * v.C;
      for (int64_t c = 0; c < v.C; ++c) b[c] = static_cast<acc_t>(q[c * v.sC]);
    }
  } else {
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* q = p + c * v.sC;
      for (int64_t w = 0; w < v.W; ++w) buf[w * v.C + c] = static_cast<acc_t>(q[w * v.sW]);
    }
  }
}

// Inverse of gather_row: write buf[w*C + c] into row (n, h) of x.
template <typename scalar_t, typename acc_t>
inline void scatter_row(scalar_t* x, const View4& v, int64_t n, int64_t h, const acc_t* buf) {
  scalar_t* p = x + n * v.sN + h * v.sH;
  if (chan_inner(v)) {
    for (int64_t w = 0; w < v.W; ++w) {
      scalar_t* q = p + w * v.sW;
      const acc_t* b = buf + w * v.C;
      for (int64_t c = 0; c < v.C; ++c) q[c * v.sC] = static_cast<scalar_t>(b[c]);
    }
  } else {
    for (int64_t c = 0; c < v.C; ++c) {
      scalar_t* q = p + c * v.sC;
      for (int64_t w = 0; w < v.W; ++w) q[w * v.sW] = static_cast<scalar_t>(buf[w * v.C + c]);
    }
  }
}

// Deterministic reduction over `rows` rows into a vector of `width` sums. fn(row, racc,
// scratch) adds the contribution of one row into the zeroed row accumulator racc. Rows
// are split into a fixed number of contiguous groups (independent of the thread count);
// row sums are added to group sums, and group sums are added in order (three-level
// summation keeps fp32 rounding error small).
template <typename acc_t, typename F>
std::vector<acc_t> reduce_rows(int64_t rows, int64_t width, F fn) {
  const int64_t groups = std::max<int64_t>(
      1, std::min<int64_t>({rows, kMaxGroups, kMaxPartialElems / std::max<int64_t>(width, 1)}));
  std::vector<acc_t> partial(static_cast<size_t>(groups * width), acc_t(0));
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> racc(static_cast<size_t>(width));
    std::vector<acc_t> scratch;
    for (int64_t g = g0; g < g1; ++g) {
      acc_t* gacc = partial.data() + g * width;
      const int64_t r0 = rows * g / groups, r1 = rows * (g + 1) / groups;
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(racc.begin(), racc.end(), acc_t(0));
        fn(r, racc.data(), scratch);
        for (int64_t i = 0; i < width; ++i) gacc[i] += racc[i];
      }
    }
  });
  std::vector<acc_t> total(static_cast<size_t>(width), acc_t(0));
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[g * width + i];
  return total;
}

template <typename acc_t>
Tensor vec_to_tensor(const std::vector<acc_t>& v, at::IntArrayRef shape,
                     const at::TensorOptions& opts) {
  Tensor t = at::empty(shape, opts);
  std::memcpy(t.data_ptr<acc_t>(), v.data(), v.size() * sizeof(acc_t));
  return t;
}

// ---- small dense products of the residual-context passes --------------------------
// C (m x n) += op(A) * B with row-major contiguous buffers: op(A) = A stored (m x k) or,
// when TA, the transpose of A stored (k x m). Register-blocked loops; the fp32
// version is compiled twice and picks AVX2+FMA at run time when the CPU has it. (BLAS
// is deliberately not used: these products are small and run inside at::parallel_for,
// where a threaded BLAS oversubscribes the cores.)
#if defined(__GNUC__)
#define CONTSUP_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define CONTSUP_ALWAYS_INLINE inline
#endif

// MR x NR register tile; the AVX2 build uses 6 x 16 (12 ymm accumulators), the generic
// one 4 x 8. Columns past the last full NR block use the same tile with a runtime width.
template <typename T, bool TA, int MR, int NR>
CONTSUP_ALWAYS_INLINE void gemm_body(const T* A, const T* B, int64_t m, int64_t k, int64_t n, T* C) {
  auto a_at = [&](int64_t i, int64_t l) { return TA ? A[l * m + i] : A[i * k + l]; };
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    int64_t j = 0;
    for (; j + NR <= n; j += NR) {
      T acc[MR][NR] = {};
      for (int64_t l = 0; l < k; ++l) {
        const T* b = B + l * n + j;
        T a[MR];
        for (int r = 0; r < MR; ++r) a[r] = a_at(i + r, l);
        for (int r = 0; r < MR; ++r)
          for (int q = 0; q < NR; ++q) acc[r][q] += a[r] * b[q];
      }
      for (int r = 0; r < MR; ++r)
        for (int q = 0; q < NR; ++q) C[(i + r) * n + j + q] += acc[r][q];
    }
    if (j < n) {
      const int64_t nr = n - j;
      T acc[MR][NR] = {};
      for (int64_t l = 0; l < k; ++l) {
        const T* b = B + l * n + j;
        for (int r = 0; r < MR; ++r) {
          const T ar = a_at(i + r, l);
          for (int64_t q = 0; q < nr; ++q) acc[r][q] += ar * b[q];
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int64_t q = 0; q < nr; ++q) C[(i + r) * n + j + q] += acc[r][q];
    }
  }
  for (; i < m; ++i) {
    T* ci = C + i * n;
    for (int64_t l = 0; l < k; ++l) {
      const T ail = a_at(i, l);
      const T* bl = B + l * n;
      for (int64_t j = 0; j < n; ++j) ci[j] += ail * bl[j];
    }
  }
}

template <typename T>
void gemm_generic(const T* A, bool ta, const T* B, int64_t m, int64_t k, int64_t n, T* C) {
  if (ta) gemm_body<T, true, 4, 8>(A, B, m, k, n, C);
  else gemm_body<T, false, 4, 8>(A, B, m, k, n, C);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// AVX2+FMA micro-kernel: 6 x 16 tiles in 12 ymm accumulators (A broadcast, two B vectors
// per step); 8-wide and masked tiles for the last columns; the last m % 6 rows row by row.
// Every C element still sums its k products in order, so results do not depend on the
// thread count.
template <bool TA>
__attribute__((target("avx2,fma"), always_inline)) inline void gemm_f32_avx2_body(
    const float* A, const float* B, int64_t m, int64_t k, int64_t n, float* C) {
  constexpr int MR = 6;
  auto a_at = [&](int64_t i, int64_t l) { return TA ? A[l * m + i] : A[i * k + l]; };
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      __m256 acc[MR][2];
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t l = 0; l < k; ++l) {
        const float* b = B + l * n + j;
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          const __m256 a = _mm256_set1_ps(a_at(i + r, l));
          acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
      }
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        float* c = C + (i + r) * n + j;
        _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), acc[r][0]));
        _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), acc[r][1]));
      }
    }
    for (; j + 8 <= n; j += 8) {
      __m256 acc[MR];
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t l = 0; l < k; ++l) {
        const __m256 b0 = _mm256_loadu_ps(B + l * n + j);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a_at(i + r, l)), b0, acc[r]);
      }
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        float* c = C + (i + r) * n + j;
        _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), acc[r]));
      }
    }
    if (j < n) {
      // the last n - j < 8 columns: masked 8-wide loads and stores
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), lane);
      __m256 acc[MR];
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t l = 0; l < k; ++l) {
        const __m256 b0 = _mm256_maskload_ps(B + l * n + j, mask);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a_at(i + r, l)), b0, acc[r]);
      }
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        float* c = C + (i + r) * n + j;
        _mm256_maskstore_ps(c, mask, _mm256_add_ps(_mm256_maskload_ps(c, mask), acc[r]));
      }
    }
  }
  for (; i < m; ++i) {
    float* ci = C + i * n;
    for (int64_t l = 0; l < k; ++l) {
      const float ail = a_at(i, l);
      const float* bl = B + l * n;
      for (int64_t jj = 0; jj < n; ++jj) ci[jj] += ail * bl[jj];
    }
  }
}

__attribute__((target("avx2,fma"))) void gemm_f32_avx2(const float* A, bool ta, const float* B, int64_t m,
                                                        int64_t k, int64_t n, float* C) {
  if (ta) gemm_f32_avx2_body<true>(A, B, m, k, n, C);
  else gemm_f32_avx2_body<false>(A, B, m, k, n, C);
}
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

inline void gemm_acc(const float* A, bool ta, const float* B, int64_t m, int64_t k, int64_t n, float* C) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (cpu_has_avx2_fma()) return gemm_f32_avx2(A, ta, B, m, k, n, C);
#endif
  gemm_generic<float>(A, ta, B, m, k, n, C);
}
inline void gemm_acc(const double* A, bool ta, const double* B, int64_t m, int64_t k, int64_t n, double* C) {
  gemm_generic<double>(A, ta, B, m, k, n, C);
}

// grain (rows per task) so that a task has roughly >= 32k element operations
inline int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_row, 1));
}

}  // namespace

Tensor moments(const Tensor& x, const Tensor& center) {
  const View4 v = view4(x);
  Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "contsup_moments_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* cp = center.defined() ? center.const_data_ptr<acc_t>() : nullptr;
    auto tot = reduce_rows<acc_t>(v.N * v.H, v.C, [&](int64_t r, acc_t* racc, std::vector<acc_t>& s) {
      s.resize(v.W * v.C);
      gather_row(xp, v, r / v.H, r % v.H, s.data());
      for (int64_t w = 0; w < v.W; ++w) {
        const acc_t* b = s.data() + w * v.C;
        if (cp) {
          for (int64_t c = 0; c < v.C; ++c) { const acc_t d = b[c] - cp[c]; racc[c] += d * d; }
        } else {
          for (int64_t c = 0; c < v.C; ++c) racc[c] += b[c];
        }
      }
    });
    result = vec_to_tensor(tot, {v.C}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return result;
}

void pool_bn_relu(const Tensor& z, const Tensor& A, const Tensor& B, const Tensor& in,
                  const Tensor& out, bool relu) {
  const View4 zv = view4(z), ov = view4(out);
  const View4 iv = in.defined() ? view4(in) : ov;
  const int64_t Ho = ov.H, Wo = ov.W, sh = zv.H / Ho, sw = zv.W / Wo, C = zv.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contsup_pool_bn_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* ip = in.defined() ? in.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* Ap = A.const_data_ptr<acc_t>();
    const acc_t* Bp = B.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    at::parallel_for(0, zv.N * Ho, row_grain(sh * zv.W * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> zb(zv.W * C), acc(Wo * C), ib(ip ? Wo * C : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t dy = 0; dy < sh; ++dy) {
          gather_row(zp, zv, n, ho * sh + dy, zb.data());
          for (int64_t w = 0; w < zv.W; ++w) {
            const acc_t* b = zb.data() + w * C;
            acc_t* a = acc.data() + (w / sw) * C;
            if (relu) {
              for (int64_t c = 0; c < C; ++c) {
                const acc_t y = Ap[c] * b[c] + Bp[c];
                a[c] += y < acc_t(0) ? acc_t(0) : y;  // NaN propagates like F.relu
              }
            } else {
              for (int64_t c = 0; c < C; ++c) a[c] += Ap[c] * b[c] + Bp[c];
            }
          }
        }
        for (auto& a : acc) a *= inv;
        if (ip) {
          gather_row(ip, iv, n, ho, ib.data());
          for (int64_t i = 0; i < Wo * C; ++i) acc[i] += ib[i];
        }
        scatter_row(op, ov, n, ho, acc.data());
      }
    });
  });
}

Tensor pool_bwd_sums(const Tensor& grad, const Tensor& z, const Tensor& A, const Tensor& B,
                     const Tensor& mean) {
  const View4 zv = view4(z), gv = view4(grad);
  const int64_t C = zv.C, sh = zv.H / gv.H, sw = zv.W / gv.W;
  Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contsup_pool_bwd_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t* Ap = A.const_data_ptr<acc_t>();
    const acc_t* Bp = B.const_data_ptr<acc_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    auto tot = reduce_rows<acc_t>(zv.N * zv.H, 2 * C, [&](int64_t r, acc_t* racc, std::vector<acc_t>& s) {
      const int64_t n = r / zv.H, h = r % zv.H;
      s.resize(zv.W * C + gv.W * C);
      acc_t* zb = s.data();
      acc_t* gb = zb + zv.W * C;
      gather_row(zp, zv, n, h, zb);
      gather_row(gp, gv, n, h / sh, gb);
      for (int64_t w = 0; w < zv.W; ++w) {
        const acc_t* zr = zb + w * C;
        const acc_t* gr = gb + (w / sw) * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t ga = (Ap[c] * zr[c] + Bp[c] > acc_t(0)) ? gr[c] * inv : acc_t(0);
          racc[c] += ga;
          racc[C + c] += ga * (zr[c] - mp[c]);
        }
      }
    });
    result = vec_to_tensor(tot, {2, C}, z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return result;
}

void pool_bwd_dz(const Tensor& grad, const Tensor& z, const Tensor& A, const Tensor& B,
                 const Tensor& mean, const Tensor& Q, const Tensor& R, const Tensor& dz) {
  const View4 zv = view4(z), gv = view4(grad), dv = view4(dz);
  const int64_t C = zv.C, sh = zv.H / gv.H, sw = zv.W / gv.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contsup_pool_bwd_dz_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dz.mutable_data_ptr<scalar_t>();
    const acc_t *Ap = A.const_data_ptr<acc_t>(), *Bp = B.const_data_ptr<acc_t>();
    const acc_t *mp = mean.const_data_ptr<acc_t>(), *Qp = Q.const_data_ptr<acc_t>(),
                *Rp = R.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    at::parallel_for(0, zv.N * zv.H, row_grain(zv.W * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> zb(zv.W * C), gb(gv.W * C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / zv.H, h = r % zv.H;
        gather_row(zp, zv, n, h, zb.data());
        gather_row(gp, gv, n, h / sh, gb.data());
        for (int64_t w = 0; w < zv.W; ++w) {
          acc_t* zr = zb.data() + w * C;
          const acc_t* gr = gb.data() + (w / sw) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t x = zr[c];
            const acc_t ga = (Ap[c] * x + Bp[c] > acc_t(0)) ? gr[c] * inv : acc_t(0);
            zr[c] = Ap[c] * ga - Qp[c] - (x - mp[c]) * Rp[c];
          }
        }
        scatter_row(dp, dv, n, h, zb.data());
      }
    });
  });
}

Tensor comoment(const Tensor& c, const Tensor& mean) {
  const View4 v = view4(c);
  const int64_t Cr = v.C;
  Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "contsup_comoment_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    auto tot = reduce_rows<acc_t>(v.N * v.H, Cr * Cr, [&](int64_t r, acc_t* racc, std::vector<acc_t>& s) {
      s.resize(v.W * Cr);
      acc_t* d = s.data();
      gather_row(cp, v, r / v.H, r % v.H, d);
      for (int64_t w = 0; w < v.W; ++w)
        for (int64_t j = 0; j < Cr; ++j) d[w * Cr + j] -= mp[j];
      gemm_acc(d, true, d, Cr, v.W, Cr, racc);  // racc += D^T D
    });
    result = vec_to_tensor(tot, {Cr, Cr}, c.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return result;
}

void residual_out(const Tensor& c, const Tensor& Wt, const Tensor& bp, const Tensor& in,
                  const Tensor& out) {
  const View4 cv = view4(c), ov = view4(out), iv = view4(in);
  const int64_t Cr = cv.C, C = ov.C, Ho = ov.H, Wo = ov.W, sh = cv.H / Ho, sw = cv.W / Wo;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "contsup_residual_out_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* wt = Wt.const_data_ptr<acc_t>();
    const acc_t* bq = bp.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    const int64_t P = sh * cv.W;  // context pixels of one output row
    at::parallel_for(0, cv.N * Ho, row_grain(P * Cr * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> cb(P * Cr), y(P * C), acc(Wo * C), ib(Wo * C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        for (int64_t dy = 0; dy < sh; ++dy) gather_row(cp, cv, n, ho * sh + dy, cb.data() + dy * cv.W * Cr);
        for (int64_t p = 0; p < P; ++p) std::copy(bq, bq + C, y.data() + p * C);
        gemm_acc(cb.data(), false, wt, P, Cr, C, y.data());  // y = b' + c W'^T
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* yp = y.data() + p * C;
          acc_t* a = acc.data() + ((p % cv.W) / sw) * C;
          for (int64_t k = 0; k < C; ++k) a[k] += yp[k] < acc_t(0) ? acc_t(0) : yp[k];
        }
        gather_row(ip, iv, n, ho, ib.data());
        for (int64_t i = 0; i < Wo * C; ++i) acc[i] = ib[i] + acc[i] * inv;
        scatter_row(op, ov, n, ho, acc.data());
      }
    });
  });
}

std::tuple<Tensor, Tensor> residual_bwd_sums(const Tensor& grad, const Tensor& c,
                                             const Tensor& Wt, const Tensor& bp,
                                             const Tensor& center) {
  const View4 cv = view4(c), gv = view4(grad);
  const int64_t Cr = cv.C, C = gv.C, sh = cv.H / gv.H, sw = cv.W / gv.W;
  Tensor G, Sg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "contsup_residual_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t* wt = Wt.const_data_ptr<acc_t>();
    const acc_t* bq = bp.const_data_ptr<acc_t>();
    const acc_t* ctr = center.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    const int64_t Wc = cv.W;
    // row accumulator: [G (C x Cr) | Sg (C)]
    auto tot = reduce_rows<acc_t>(cv.N * cv.H, C * Cr + C, [&](int64_t r, acc_t* racc, std::vector<acc_t>& s) {
      const int64_t n = r / cv.H, h = r % cv.H;
      s.resize(Wc * Cr + gv.W * C + Wc * C);
      acc_t* cb = s.data();
      acc_t* gb = cb + Wc * Cr;
      acc_t* y = gb + gv.W * C;  // y, then g_a in place
      gather_row(cp, cv, n, h, cb);
      gather_row(gp, gv, n, h / sh, gb);
      for (int64_t p = 0; p < Wc; ++p) std::copy(bq, bq + C, y + p * C);
      gemm_acc(cb, false, wt, Wc, Cr, C, y);  // y = b' + c W'^T  (pre-activation, BN folded in)
      acc_t* Sgr = racc + C * Cr;
      for (int64_t p = 0; p < Wc; ++p) {
        acc_t* yp = y + p * C;
        const acc_t* gr = gb + (p / sw) * C;
        for (int64_t k = 0; k < C; ++k) {
          yp[k] = yp[k] > acc_t(0) ? gr[k] * inv : acc_t(0);  // g_a
          Sgr[k] += yp[k];
        }
      }
      for (int64_t p = 0; p < Wc; ++p)
        for (int64_t j = 0; j < Cr; ++j) cb[p * Cr + j] -= ctr[j];
      gemm_acc(y, true, cb, C, Wc, Cr, racc);  // G += g_a^T (c - center)
    });
    const auto opts = c.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    std::vector<acc_t> gpart(tot.begin(), tot.begin() + C * Cr), spart(tot.begin() + C * Cr, tot.end());
    G = vec_to_tensor(gpart, {C, Cr}, opts);
    Sg = vec_to_tensor(spart, {C}, opts);
  });
  return {G, Sg};
}


// ---- image context: 3x3 convolution with padding 1, never materialised ---------------
// A "patch" x_p of the C_in-channel map u at pixel p = (n, h, w) is the K = 9*C_in vector
// x_p[j*9 + dy*3 + dx] = u[n, j, h+dy-1, w+dx-1] (0 outside the image), i.e. the order of
// weight.reshape(C, K); the convolution is z_p = W x_p + b. The passes below build the
// patches of one image row at a time (a (W x K) matrix) and run every product through the
// register-blocked gemm_acc, so no (N, C, H, W) tensor is ever created.
namespace {

// Patches of row (n, r) of u into X (W x K): gathers rows r-1, r, r+1 into `rows` (3 x W x
// C_in scratch, zeros outside the image) and expands them.
template <typename scalar_t, typename acc_t>
void patch_row(const scalar_t* up, const View4& v, int64_t n, int64_t r, acc_t* rows, acc_t* X) {
  const int64_t W = v.W, Ci = v.C, K = 9 * Ci;
  for (int64_t dy = 0; dy < 3; ++dy) {
    const int64_t hh = r + dy - 1;
    acc_t* dst = rows + dy * W * Ci;
    if (hh < 0 || hh >= v.H) std::fill(dst, dst + W * Ci, acc_t(0));
    else gather_row(up, v, n, hh, dst);
  }
  for (int64_t x = 0; x < W; ++x) {
    acc_t* xp = X + x * K;
    for (int64_t dy = 0; dy < 3; ++dy) {
      const acc_t* row = rows + dy * W * Ci;
      for (int64_t dx = 0; dx < 3; ++dx) {
        const int64_t xx = x + dx - 1;
        const int64_t o = dy * 3 + dx;
        if (xx < 0 || xx >= W) {
          for (int64_t j = 0; j < Ci; ++j) xp[j * 9 + o] = acc_t(0);
        } else {
          const acc_t* src = row + xx * Ci;
          for (int64_t j = 0; j < Ci; ++j) xp[j * 9 + o] = src[j];
        }
      }
    }
  }
}

// z = X Wt + b for the W pixels of a patch row: Z (W x C).
template <typename acc_t>
inline void conv_row(const acc_t* X, const acc_t* Wt, const acc_t* b, int64_t W, int64_t K, int64_t C,
                     acc_t* Z) {
  for (int64_t p = 0; p < W; ++p) std::copy(b, b + C, Z + p * C);
  gemm_acc(X, false, Wt, W, K, C, Z);
}

}  // namespace

// Patch sums from row sums: row h of u adds to entry (j, dy, dx) of the pixels of row
// h - dy + 1 (when inside the image) its sum over the columns x with x - dx + 1 inside:
// all columns but the last (dx = 0), all (dx = 1), all but the first (dx = 2).
Tensor patch_sum(const Tensor& u) {
  const View4 v = view4(u);
  const int64_t Ci = v.C, K = 9 * Ci, W = v.W, H = v.H;
  Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_patch_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    auto tot = reduce_rows<acc_t>(v.N * H, K, [&](int64_t r, acc_t* racc, std::vector<acc_t>& s) {
      const int64_t h = r % H;
      s.resize(W * Ci + Ci);
      gather_row(up, v, r / H, h, s.data());
      acc_t* rs = s.data() + W * Ci;
      std::fill(rs, rs + Ci, acc_t(0));
      for (int64_t x = 0; x < W; ++x)
        for (int64_t j = 0; j < Ci; ++j) rs[j] += s[x * Ci + j];
      for (int64_t dy = 0; dy < 3; ++dy) {
        const int64_t ph = h - dy + 1;
        if (ph < 0 || ph >= H) continue;
        for (int64_t j = 0; j < Ci; ++j) {
          acc_t* e = racc + j * 9 + dy * 3;
          e[0] += rs[j] - s[(W - 1) * Ci + j];
          e[1] += rs[j];
          e[2] += rs[j] - s[j];
        }
      }
    });
    result = vec_to_tensor(tot, {K}, u.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return result;
}

// Centred patch co-moment sum_p (x_p - mean)(x_p - mean)^T without forming K x K outer
// products per pixel. Let ut = u - c (c_j = mean[j*9 + 4], the channel mean), zero outside the
// image, xt_p its patches and Y_h (W x 3C_in) the horizontal 3-neighbourhoods of row h of ut
// (Y_h[w, j*3 + dx] = ut[j, h, w+dx-1]). Then the (dy, dy') block of sum_p xt_p xt_p^T is a
// row-lagged Gram matrix of the Y's: with L_l = sum_h Y_h^T Y_{h+l} (zero rows outside),
//   (0,0) = L_0 - Y_{H-1}^T Y_{H-1},  (1,1) = L_0,  (2,2) = L_0 - Y_0^T Y_0,
//   (0,1) = (1,2) = L_1,  (0,2) = L_2   (and the transposes below the diagonal),
// i.e. 3 (3C_in)^2 products per pixel instead of (9C_in)^2. The patch x_p = xt_p + c o m_p,
// where the in-image mask m_p depends only on the border class of p (16 classes: top /
// bottom / both / neither row x the same for columns), so with d_k = c o m_k - mean,
// s_k = sum_{p in class k} xt_p and n_k pixels per class:
//   sum_p (x_p - mean)(x_p - mean)^T = sum_p xt_p xt_p^T + sum_k (s_k d_k^T + d_k s_k^T + n_k d_k d_k^T).
// Every term is a sum of centred quantities (no E[xx^T] - mu mu^T cancellation).
Tensor patch_comoment(const Tensor& u, const Tensor& mean) {
  const View4 v = view4(u);
  const int64_t Ci = v.C, K = 9 * Ci, L = 3 * Ci, LL = L * L, W = v.W, H = v.H;
  constexpr int64_t kClasses = 16;
  Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_patch_comoment_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    std::vector<acc_t> c(Ci);
    for (int64_t j = 0; j < Ci; ++j) c[j] = mp[j * 9 + 4];
    auto border_class = [&](int64_t h, int64_t w) {
      return ((h == 0) + 2 * (h == H - 1)) * 4 + (w == 0) + 2 * (w == W - 1);
    };
    // per-image accumulator: [L0 | L1 | L2 | Y_0^T Y_0 | Y_{H-1}^T Y_{H-1} | s (16 x K)]
    const int64_t width = 5 * LL + kClasses * K;
    auto tot = reduce_rows<acc_t>(v.N, width, [&](int64_t n, acc_t* racc, std::vector<acc_t>& s) {
      s.resize(W * Ci + H * W * L);
      acc_t* row = s.data();
      acc_t* Y = row + W * Ci;  // Y_0, ..., Y_{H-1} stacked: (H*W) x L
      for (int64_t h = 0; h < H; ++h) {
        gather_row(up, v, n, h, row);
        acc_t* Yh = Y + h * W * L;
        for (int64_t x = 0; x < W; ++x)
          for (int64_t dx = 0; dx < 3; ++dx) {
            const int64_t xx = x + dx - 1;
            for (int64_t j = 0; j < Ci; ++j)
              Yh[x * L + j * 3 + dx] = (xx < 0 || xx >= W) ? acc_t(0) : row[xx * Ci + j] - c[j];
          }
      }
      gemm_acc(Y, true, Y, L, H * W, L, racc);                                              // L0
      if (H > 1) gemm_acc(Y, true, Y + W * L, L, (H - 1) * W, L, racc + LL);               // L1
      if (H > 2) gemm_acc(Y, true, Y + 2 * W * L, L, (H - 2) * W, L, racc + 2 * LL);       // L2
      gemm_acc(Y, true, Y, L, W, L, racc + 3 * LL);                                         // Y_0^T Y_0
      gemm_acc(Y + (H - 1) * W * L, true, Y + (H - 1) * W * L, L, W, L, racc + 4 * LL);   // last row
      acc_t* sc = racc + 5 * LL;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x = 0; x < W; ++x) {
          acc_t* sk = sc + border_class(h, x) * K;
          for (int64_t dy = 0; dy < 3; ++dy) {
            const int64_t hh = h + dy - 1;
            if (hh < 0 || hh >= H) continue;
            const acc_t* yp = Y + (hh * W + x) * L;  // [j*3 + dx] = ut[j, hh, x+dx-1]
            for (int64_t j = 0; j < Ci; ++j)
              for (int64_t dx = 0; dx < 3; ++dx) sk[j * 9 + dy * 3 + dx] += yp[j * 3 + dx];
          }
        }
    });
    // assemble sum_p xt_p xt_p^T from the lagged blocks
    std::vector<acc_t> S(K * K);
    const acc_t* L0 = tot.data();
    const acc_t* L1 = L0 + LL;
    const acc_t* L2 = L0 + 2 * LL;
    const acc_t* F0 = L0 + 3 * LL;
    const acc_t* FH = L0 + 4 * LL;
    for (int64_t dy = 0; dy < 3; ++dy)
      for (int64_t dy2 = dy; dy2 < 3; ++dy2)
        for (int64_t j = 0; j < Ci; ++j)
          for (int64_t dx = 0; dx < 3; ++dx)
            for (int64_t j2 = 0; j2 < Ci; ++j2)
              for (int64_t dx2 = 0; dx2 < 3; ++dx2) {
                const int64_t a = (j * 3 + dx) * L + j2 * 3 + dx2;
                acc_t val;
                if (dy2 - dy == 2) val = L2[a];
                else if (dy2 - dy == 1) val = L1[a];
                else val = L0[a] - (dy == 0 ? FH[a] : dy == 2 ? F0[a] : acc_t(0));
                const int64_t k = j * 9 + dy * 3 + dx, k2 = j2 * 9 + dy2 * 3 + dx2;
                S[k * K + k2] = val;
                S[k2 * K + k] = val;
              }
    // border-class corrections: n_k = N * rows_in_class * cols_in_class
    auto count = [](int64_t len, int64_t cls) -> int64_t {  // cls: 0 inner, 1 first, 2 last, 3 both
      if (len == 1) return cls == 3 ? 1 : 0;
      return cls == 0 ? len - 2 : cls == 3 ? 0 : 1;
    };
    const acc_t* sc = tot.data() + 5 * LL;
    std::vector<acc_t> d(K);
    for (int64_t cls = 0; cls < kClasses; ++cls) {
      const int64_t rc = cls / 4, cc = cls % 4;
      const acc_t nk = static_cast<acc_t>(v.N * count(H, rc) * count(W, cc));
      if (nk == acc_t(0)) continue;
      for (int64_t j = 0; j < Ci; ++j)
        for (int64_t dy = 0; dy < 3; ++dy)
          for (int64_t dx = 0; dx < 3; ++dx) {
            const bool out = (dy == 0 && (rc & 1)) || (dy == 2 && (rc & 2)) || (dx == 0 && (cc & 1)) ||
                             (dx == 2 && (cc & 2));
            const int64_t k = j * 9 + dy * 3 + dx;
            d[k] = (out ? acc_t(0) : c[j]) - mp[k];
          }
      const acc_t* sk = sc + cls * K;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t k2 = 0; k2 < K; ++k2)
          S[k * K + k2] += sk[k] * d[k2] + d[k] * sk[k2] + nk * d[k] * d[k2];
    }
    result = vec_to_tensor(S, {K, K}, u.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return result;
}

void image_out(const Tensor& u, const Tensor& Wt, const Tensor& b, const Tensor& A, const Tensor& B,
               const Tensor& in, const Tensor& out) {
  const View4 v = view4(u), ov = view4(out), iv = view4(in);
  const int64_t K = 9 * v.C, C = ov.C, Ho = ov.H, Wo = ov.W, sh = v.H / Ho, sw = v.W / Wo;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_image_out_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* wt = Wt.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t* Ap = A.const_data_ptr<acc_t>();
    const acc_t* Bp = B.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    const int64_t P = sh * v.W;  // input pixels of one output row
    at::parallel_for(0, v.N * Ho, 1, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> rows(3 * v.W * v.C), X(P * K), Z(P * C), acc(Wo * C), ib(Wo * C);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t dy = 0; dy < sh; ++dy) patch_row(up, v, n, ho * sh + dy, rows.data(), X.data() + dy * v.W * K);
        conv_row(X.data(), wt, bp, P, K, C, Z.data());
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* zp = Z.data() + p * C;
          acc_t* a = acc.data() + ((p % v.W) / sw) * C;
          for (int64_t k = 0; k < C; ++k) {
            const acc_t y = Ap[k] * zp[k] + Bp[k];
            a[k] += y < acc_t(0) ? acc_t(0) : y;  // NaN propagates like F.relu
          }
        }
        gather_row(ip, iv, n, ho, ib.data());
        for (int64_t i = 0; i < Wo * C; ++i) acc[i] = ib[i] + acc[i] * inv;
        scatter_row(op, ov, n, ho, acc.data());
      }
    });
  });
}

namespace {
// g_a = up(grad)/area * [A z + B > 0] for the W pixels of one row: Z (W x C) holds z, gb the
// gathered grad row (Wo x C); writes G_A (W x C), which may alias Z.
template <typename acc_t>
inline void masked_grad_row(const acc_t* Z, const acc_t* gb, const acc_t* Ap, const acc_t* Bp, acc_t inv,
                            int64_t W, int64_t C, int64_t sw, acc_t* G_A) {
  for (int64_t x = 0; x < W; ++x) {
    const acc_t* zp = Z + x * C;
    const acc_t* gr = gb + (x / sw) * C;
    acc_t* ga = G_A + x * C;
    for (int64_t k = 0; k < C; ++k) ga[k] = Ap[k] * zp[k] + Bp[k] > acc_t(0) ? gr[k] * inv : acc_t(0);
  }
}
}  // namespace

std::tuple<Tensor, Tensor> image_bwd_sums(const Tensor& grad, const Tensor& u, const Tensor& Wt,
                                          const Tensor& b, const Tensor& A, const Tensor& B,
                                          const Tensor& center) {
  const View4 v = view4(u), gv = view4(grad);
  const int64_t K = 9 * v.C, C = gv.C, sh = v.H / gv.H, sw = v.W / gv.W, W = v.W;
  // one reduction "row" = a band of up to 8 image rows (fixed by the shape: deterministic)
  const int64_t band = std::min<int64_t>(v.H, 8), bands = (v.H + band - 1) / band;
  Tensor G, Sg;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_image_bwd_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const acc_t* wt = Wt.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t* Ap = A.const_data_ptr<acc_t>();
    const acc_t* Bp = B.const_data_ptr<acc_t>();
    const acc_t* ctr = center.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    // accumulator: [G (C x K) | Sg (C)]
    auto tot = reduce_rows<acc_t>(v.N * bands, C * K + C, [&](int64_t r, acc_t* racc, std::vector<acc_t>& s) {
      const int64_t n = r / bands, y0 = (r % bands) * band, y1 = std::min(v.H, y0 + band);
      const int64_t P = (y1 - y0) * W;
      s.resize(3 * W * v.C + P * K + P * C + gv.W * C);
      acc_t* X = s.data() + 3 * W * v.C;
      acc_t* Z = X + P * K;
      acc_t* gb = Z + P * C;
      for (int64_t y = y0; y < y1; ++y) patch_row(up, v, n, y, s.data(), X + (y - y0) * W * K);
      conv_row(X, wt, bp, P, K, C, Z);
      for (int64_t y = y0; y < y1; ++y) {
        gather_row(gp, gv, n, y / sh, gb);
        acc_t* Zy = Z + (y - y0) * W * C;
        masked_grad_row(Zy, gb, Ap, Bp, inv, W, C, sw, Zy);  // Z := g_a
      }
      acc_t* Sgr = racc + C * K;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t k = 0; k < C; ++k) Sgr[k] += Z[p * C + k];
      for (int64_t p = 0; p < P; ++p)
        for (int64_t k = 0; k < K; ++k) X[p * K + k] -= ctr[k];
      gemm_acc(Z, true, X, C, P, K, racc);  // G += g_a^T (x - center)
    });
    const auto opts = u.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    std::vector<acc_t> gpart(tot.begin(), tot.begin() + C * K), spart(tot.begin() + C * K, tot.end());
    G = vec_to_tensor(gpart, {C, K}, opts);
    Sg = vec_to_tensor(spart, {C}, opts);
  });
  return {G, Sg};
}

void image_bwd_du(const Tensor& grad, const Tensor& u, const Tensor& Wt, const Tensor& b, const Tensor& A,
                  const Tensor& B, const Tensor& mean, const Tensor& Q, const Tensor& R, const Tensor& du) {
  const View4 v = view4(u), gv = view4(grad), dv = view4(du);
  const int64_t Ci = v.C, K = 9 * Ci, C = gv.C, sh = v.H / gv.H, sw = v.W / gv.W, W = v.W;
  // tasks: (image n, band of RB rows of du); each recomputes dz on its rows plus a 1-row halo
  // above and below ((RB + 2) / RB of the convolution work), as one product per band
  const int64_t RB = std::min<int64_t>(v.H, 16);
  const int64_t blocks = (v.H + RB - 1) / RB;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "contsup_image_bwd_du_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = du.mutable_data_ptr<scalar_t>();
    const acc_t* wt = Wt.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t* Ap = A.const_data_ptr<acc_t>();
    const acc_t* Bp = B.const_data_ptr<acc_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* Qp = Q.const_data_ptr<acc_t>();
    const acc_t* Rp = R.const_data_ptr<acc_t>();
    const acc_t inv = acc_t(1) / static_cast<acc_t>(sh * sw);
    std::vector<acc_t> Wm(C * K);  // W (C x K), row-major
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) Wm[c * K + k] = wt[k * C + c];
    at::parallel_for(0, v.N * blocks, 1, [&](int64_t t0, int64_t t1) {
      const int64_t PM = (RB + 2) * W;
      std::vector<acc_t> rows(3 * W * Ci), X(PM * K), Z(PM * C), gb(gv.W * C), T(PM * K), dacc(RB * W * Ci);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / blocks, y0 = (t % blocks) * RB, y1 = std::min(v.H, y0 + RB);
        const int64_t r0 = std::max<int64_t>(0, y0 - 1), r1 = std::min(v.H, y1 + 1), P = (r1 - r0) * W;
        for (int64_t r = r0; r < r1; ++r) patch_row(up, v, n, r, rows.data(), X.data() + (r - r0) * W * K);
        conv_row(X.data(), wt, bp, P, K, C, Z.data());
        for (int64_t r = r0; r < r1; ++r) {
          gather_row(gp, gv, n, r / sh, gb.data());
          acc_t* Zr = Z.data() + (r - r0) * W * C;
          for (int64_t x = 0; x < W; ++x) {
            acc_t* zp = Zr + x * C;
            const acc_t* gr = gb.data() + (x / sw) * C;
            for (int64_t k = 0; k < C; ++k) {
              const acc_t z = zp[k];
              const acc_t ga = Ap[k] * z + Bp[k] > acc_t(0) ? gr[k] * inv : acc_t(0);
              zp[k] = Ap[k] * ga - Qp[k] - (z - mp[k]) * Rp[k];  // dz
            }
          }
        }
        std::fill(T.begin(), T.begin() + P * K, acc_t(0));
        gemm_acc(Z.data(), false, Wm.data(), P, C, K, T.data());  // T = dz W  (P x K)
        // T[(r, x), j*9 + dy*3 + dx] belongs to du[r + dy - 1, x + dx - 1, j]
        std::fill(dacc.begin(), dacc.end(), acc_t(0));
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t dy = 0; dy < 3; ++dy) {
            const int64_t y = r + dy - 1;
            if (y < y0 || y >= y1) continue;
            acc_t* drow = dacc.data() + (y - y0) * W * Ci;
            for (int64_t x = 0; x < W; ++x) {
              const acc_t* tx = T.data() + ((r - r0) * W + x) * K;
              for (int64_t dx = 0; dx < 3; ++dx) {
                const int64_t xx = x + dx - 1;
                if (xx < 0 || xx >= W) continue;
                acc_t* d = drow + xx * Ci;
                const int64_t o = dy * 3 + dx;
                for (int64_t j = 0; j < Ci; ++j) d[j] += tx[j * 9 + o];
              }
            }
          }
        for (int64_t y = y0; y < y1; ++y) scatter_row(dp, dv, n, y, dacc.data() + (y - y0) * W * Ci);
      }
    });
  });
}

}  // namespace cpu

// ------------------------------------------------------------------------------------
// Device-agnostic operator logic
// ------------------------------------------------------------------------------------
namespace {

#if defined(CONTSUP_CUDA_EMULATION)
// test-only build: the CUDA kernels' code run on CPU threads by an emulator
#define CONTSUP_PASS(name, dev) (&cuda::name)
#elif defined(CONTSUP_WITH_CUDA)
#define CONTSUP_PASS(name, dev) ((dev).is_cuda() ? &cuda::name : &cpu::name)
#else
#define CONTSUP_PASS(name, dev) (&cpu::name)
#endif

void check_supported_device(const Tensor& t, const char* name) {
#ifdef CONTSUP_WITH_CUDA
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "contsup: ", name,
              " must be a CPU or CUDA tensor, got device ", t.device());
#else
  TORCH_CHECK(t.device().is_cpu(), "contsup: ", name, " is on device ", t.device(),
              ", but this build of contsup_fast._C has only CPU kernels (rebuild with a CUDA "
              "toolkit to get the CUDA kernels)");
#endif
}

void check_dtype(const Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "contsup: ", name, " must have dtype float32, float64, float16 or bfloat16, got ", s);
}

void check_feature_map(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "contsup: ", name, " must be a 4-D (N, C, H, W) tensor, got a ",
              t.dim(), "-D tensor of shape ", t.sizes());
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(t.size(d) > 0, "contsup: ", name, " must be non-empty, got shape ", t.sizes());
  TORCH_CHECK(t.numel() < (int64_t(1) << 31), "contsup: ", name, " has ", t.numel(),
              " elements; at most 2^31 - 1 are supported");
  check_dtype(t, name);
  check_supported_device(t, name);
}

void check_same_device(const Tensor& t, const Tensor& ref, const std::string& name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "contsup: ", name, " is on device ", t.device(), " but ",
              ref_name, " is on device ", ref.device(), "; all tensors must be on the same device");
}

void check_channel_vec(const Tensor& t, int64_t C, const std::string& name, const Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.defined(), "contsup: ", name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "contsup: ", name, " must have shape (", C,
              ",) to match the ", C, " channels of ", ref_name, ", got shape ", t.sizes());
  check_dtype(t, name.c_str());
  check_same_device(t, ref, name, ref_name);
}

// Integer pooling factors (sh, sw) from an input spatial size to an output spatial size.
std::pair<int64_t, int64_t> pool_factors(const Tensor& x, const Tensor& ref, const std::string& name,
                                         const char* ref_name) {
  const int64_t H = x.size(2), W = x.size(3), Ho = ref.size(2), Wo = ref.size(3);
  TORCH_CHECK(H % Ho == 0 && W % Wo == 0, "contsup: ", name, " has spatial size ", H, "x", W,
              ", which is not an integer multiple of the spatial size ", Ho, "x", Wo, " of ",
              ref_name, "; expected (s*", Ho, ", s*", Wo, ") for a positive integer s");
  return {H / Ho, W / Wo};
}

inline at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Tensor to_acc(const Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// BatchNorm statistics of z over (N, H, W): two deterministic passes (mean, then centred
// second moment) -- avoids the cancellation of E[z^2] - E[z]^2.
std::tuple<Tensor, Tensor> channel_stats(const Tensor& z) {
  const double M = static_cast<double>(z.numel() / z.size(1));
  auto moments = CONTSUP_PASS(moments, z.device());
  Tensor mean = moments(z, Tensor()).div_(M);
  Tensor var = moments(z, mean).div_(M);
  return {mean, var};
}

void check_training_count(int64_t M, bool training, const char* name) {
  TORCH_CHECK(!training || M > 1, "contsup: expected more than 1 value per channel when training "
              "(BatchNorm over ", name, "), got ", M);
}

// ---------------------------- bn -> relu -> pool (ops 2 and 3) -----------------------
// Forward shared by image_context_tail (h given, out = h + pool) and bn_relu_gap
// (out = pooled (N, C)). Returns (out, mean, var) with fp32/fp64 statistics.
std::tuple<Tensor, Tensor, Tensor> bn_relu_pool_forward(const Tensor& z, const Tensor& h,
                                                        const Tensor& gamma, const Tensor& beta,
                                                        const Tensor& rm, const Tensor& rv,
                                                        bool training, double eps) {
  const int64_t C = z.size(1);
  const auto acc = acc_dtype(z);
  check_training_count(z.numel() / C, training, "z");
  Tensor mean, var;
  if (training) {
    std::tie(mean, var) = channel_stats(z);
  } else {
    mean = rm.to(acc, /*non_blocking=*/false, /*copy=*/true);
    var = rv.to(acc, false, true);
  }
  Tensor rstd = (var + eps).rsqrt();
  Tensor A = to_acc(gamma, acc) * rstd;
  Tensor B = to_acc(beta, acc) - mean * A;
  Tensor out, out4;
  if (h.defined()) {
    out = at::empty_like(h);
    out4 = out;
  } else {
    out = at::empty({z.size(0), C}, z.options());
    out4 = out.view({z.size(0), C, 1, 1});
  }
  CONTSUP_PASS(pool_bn_relu, z.device())(z, A, B, h, out4, /*relu=*/true);
  return {out, mean, var};
}

// Backward shared by ops 2 and 3: grad (N, C, Ho, Wo) of the pooled output.
std::tuple<Tensor, Tensor, Tensor> bn_relu_pool_backward(const Tensor& grad_in, const Tensor& z,
                                                         const Tensor& gamma, const Tensor& beta,
                                                         const Tensor& mean_in,
                                                         const Tensor& var_in, bool training,
                                                         double eps) {
  const auto acc = acc_dtype(z);
  const double M = static_cast<double>(z.numel() / z.size(1));
  const Tensor grad = grad_in.scalar_type() == z.scalar_type() ? grad_in : grad_in.to(z.scalar_type());
  const Tensor mean = to_acc(mean_in, acc), var = to_acc(var_in, acc);
  Tensor rstd = (var + eps).rsqrt();
  Tensor A = to_acc(gamma, acc) * rstd;
  Tensor B = to_acc(beta, acc) - mean * A;
  Tensor sums = CONTSUP_PASS(pool_bwd_sums, z.device())(grad, z, A, B, mean);  // (2, C)
  Tensor Sg = sums[0], Sgy = sums[1];
  Tensor dgamma = Sgy * rstd;  // sum g_a * yhat
  Tensor dbeta = Sg.clone();
  Tensor Q, R;
  if (training) {
    Q = (A * Sg).div_(M).contiguous();
    R = (A * rstd * rstd * Sgy).div_(M).contiguous();
  } else {
    Q = at::zeros_like(Sg);
    R = at::zeros_like(Sg);
  }
  Tensor dz = at::empty_like(z);
  CONTSUP_PASS(pool_bwd_dz, z.device())(grad, z, A, B, mean, Q, R, dz);
  return {dz, dgamma.to(gamma.scalar_type()), dbeta.to(beta.scalar_type())};
}

void check_bn_params(const Tensor& z, const char* zname, const Tensor& gamma, const Tensor& beta,
                     const Tensor& m, const Tensor& v, const char* mname, const char* vname) {
  const int64_t C = z.size(1);
  check_channel_vec(gamma, C, "bn_weight", z, zname);
  check_channel_vec(beta, C, "bn_bias", z, zname);
  check_channel_vec(m, C, mname, z, zname);
  check_channel_vec(v, C, vname, z, zname);
}

}  // namespace

// ---------------------------------- op 2 --------------------------------------------
// image_context_tail: out = h + avgpool_s(relu(bn(z))).
//   h (N, C, H, W), z (N, C, s*H, s*W) same dtype as h; params (C,) any float dtype.
//   Returns (out in h's dtype/format, mean, var) fp32 (fp64 for fp64 z).
//   Autograd (contsup_fast/_native.py) saves z, bn_weight, bn_bias and the returned
//   (mean, var) only -- no normalised/activated copy of z.
std::tuple<Tensor, Tensor, Tensor> image_context_tail(const Tensor& h, const Tensor& z,
                                                      const Tensor& bn_weight, const Tensor& bn_bias,
                                                      const Tensor& running_mean,
                                                      const Tensor& running_var, bool training,
                                                      double eps) {
  check_feature_map(h, "h");
  check_feature_map(z, "z");
  check_same_device(z, h, "z", "h");
  TORCH_CHECK(z.scalar_type() == h.scalar_type(), "contsup: z and h must have the same dtype, got ",
              z.scalar_type(), " and ", h.scalar_type());
  TORCH_CHECK(z.size(0) == h.size(0) && z.size(1) == h.size(1), "contsup: z must have the batch size "
              "and channels of h (N=", h.size(0), ", C=", h.size(1), "), got shape ", z.sizes());
  pool_factors(z, h, "z", "h");
  check_bn_params(z, "z", bn_weight, bn_bias, running_mean, running_var, "running_mean", "running_var");
  c10::OptionalDeviceGuard guard(h.device());
  return bn_relu_pool_forward(z, h, bn_weight, bn_bias, running_mean, running_var, training, eps);
}

// grads (grad_z, grad_bn_weight, grad_bn_bias) of image_context_tail; `mean`/`var` are the
// statistics returned by the forward (batch stats in training, running stats in eval).
std::tuple<Tensor, Tensor, Tensor> image_context_tail_backward(const Tensor& grad_out, const Tensor& z,
                                                               const Tensor& bn_weight,
                                                               const Tensor& bn_bias,
                                                               const Tensor& mean, const Tensor& var,
                                                               bool training, double eps) {
  check_feature_map(z, "z");
  check_feature_map(grad_out, "grad_out");
  check_same_device(grad_out, z, "grad_out", "z");
  TORCH_CHECK(grad_out.size(0) == z.size(0) && grad_out.size(1) == z.size(1),
              "contsup: grad_out must have the batch size and channels of z, got ", grad_out.sizes(),
              " and ", z.sizes());
  pool_factors(z, grad_out, "z", "grad_out");
  check_bn_params(z, "z", bn_weight, bn_bias, mean, var, "mean", "var");
  check_training_count(z.numel() / z.size(1), training, "z");
  c10::OptionalDeviceGuard guard(z.device());
  return bn_relu_pool_backward(grad_out, z, bn_weight, bn_bias, mean, var, training, eps);
}

// ---------------------------------- op 3 --------------------------------------------
// bn_relu_gap: pooled (N, C) = mean_{H,W} relu(bn(z)), in z's dtype; + (mean, var).
//   Autograd (contsup_fast/_native.py) saves z, bn_weight, bn_bias and the returned
//   (mean, var) only -- no normalised/activated copy of z.
std::tuple<Tensor, Tensor, Tensor> bn_relu_gap(const Tensor& z, const Tensor& bn_weight,
                                               const Tensor& bn_bias, const Tensor& running_mean,
                                               const Tensor& running_var, bool training, double eps) {
  check_feature_map(z, "z");
  check_bn_params(z, "z", bn_weight, bn_bias, running_mean, running_var, "running_mean", "running_var");
  c10::OptionalDeviceGuard guard(z.device());
  return bn_relu_pool_forward(z, Tensor(), bn_weight, bn_bias, running_mean, running_var, training, eps);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_gap_backward(const Tensor& grad_pooled, const Tensor& z,
                                                        const Tensor& bn_weight, const Tensor& bn_bias,
                                                        const Tensor& mean, const Tensor& var,
                                                        bool training, double eps) {
  check_feature_map(z, "z");
  check_same_device(grad_pooled, z, "grad_pooled", "z");
  TORCH_CHECK(grad_pooled.dim() == 2 && grad_pooled.size(0) == z.size(0) && grad_pooled.size(1) == z.size(1),
              "contsup: grad_pooled must have shape (", z.size(0), ", ", z.size(1), "), got ",
              grad_pooled.sizes());
  check_bn_params(z, "z", bn_weight, bn_bias, mean, var, "mean", "var");
  check_training_count(z.numel() / z.size(1), training, "z");
  c10::OptionalDeviceGuard guard(z.device());
  return bn_relu_pool_backward(grad_pooled.unsqueeze(-1).unsqueeze(-1), z, bn_weight, bn_bias, mean,
                               var, training, eps);
}

// ---------------------------------- op 4 --------------------------------------------
// global_avg_pool: (N, C, H, W) -> (N, C) in h's dtype. Saves nothing but h's size/format.
Tensor global_avg_pool(const Tensor& h) {
  check_feature_map(h, "h");
  c10::OptionalDeviceGuard guard(h.device());
  const auto acc = acc_dtype(h);
  const int64_t N = h.size(0), C = h.size(1);
  Tensor out = at::empty({N, C}, h.options());
  Tensor ones = at::ones({C}, h.options().dtype(acc)), zeros = at::zeros({C}, h.options().dtype(acc));
  CONTSUP_PASS(pool_bn_relu, h.device())(h, ones, zeros, Tensor(), out.view({N, C, 1, 1}), /*relu=*/false);
  return out;
}

Tensor global_avg_pool_backward(const Tensor& grad_pooled, at::IntArrayRef input_size, bool channels_last) {
  TORCH_CHECK(input_size.size() == 4, "contsup: input_size must have 4 entries (N, C, H, W), got ",
              input_size);
  TORCH_CHECK(grad_pooled.dim() == 2 && grad_pooled.size(0) == input_size[0] &&
                  grad_pooled.size(1) == input_size[1],
              "contsup: grad_pooled must have shape (", input_size[0], ", ", input_size[1], "), got ",
              grad_pooled.sizes());
  c10::OptionalDeviceGuard guard(grad_pooled.device());
  const double area = static_cast<double>(input_size[2] * input_size[3]);
  Tensor grad_h = at::empty(input_size, grad_pooled.options().memory_format(
                                            channels_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
  grad_h.copy_((grad_pooled / area).unsqueeze(-1).unsqueeze(-1).expand(input_size));
  return grad_h;
}

// ---------------------------------- op 1 --------------------------------------------
// residual_context: out = h + sum_r avgpool_{s_r}(relu(bn_r(conv1x1_r(c_r)))).
//   h (N, C, H, W); contexts[r] (N, C_r, s_r*H, s_r*W) in h's dtype (no gradient);
//   weights[r] (C, C_r) or (C, C_r, 1, 1); biases / bn params / running stats (C,).
// The 1x1-conv output y = W c + b is never materialised. Its batch statistics follow from
// the first and second moments of c (ContSup Sec. 3 x BatchNorm):
//   mean_y = W m_c + b,   var_y = diag(W S W^T),   S = biased covariance of c over pixels.
// Returns (out, means (R, C), vars (R, C), ctx_moments) where ctx_moments concatenates,
// per term, [m_c (C_r), S (C_r*C_r)] in training (zeros in eval): everything the backward
// needs besides c and the parameters.
std::tuple<Tensor, Tensor, Tensor, Tensor> residual_context(
    const Tensor& h, at::TensorList contexts, at::TensorList weights, at::TensorList biases,
    at::TensorList bn_weights, at::TensorList bn_biases, at::TensorList running_means,
    at::TensorList running_vars, bool training, double eps) {
  check_feature_map(h, "h");
  const int64_t R = static_cast<int64_t>(contexts.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == R && static_cast<int64_t>(biases.size()) == R &&
                  static_cast<int64_t>(bn_weights.size()) == R &&
                  static_cast<int64_t>(bn_biases.size()) == R &&
                  static_cast<int64_t>(running_means.size()) == R &&
                  static_cast<int64_t>(running_vars.size()) == R,
              "contsup: contexts, weights, biases, bn_weights, bn_biases, running_means and "
              "running_vars must have the same length, got ", contexts.size(), ", ", weights.size(), ", ",
              biases.size(), ", ", bn_weights.size(), ", ", bn_biases.size(), ", ", running_means.size(),
              ", ", running_vars.size());
  c10::OptionalDeviceGuard guard(h.device());
  const int64_t N = h.size(0), C = h.size(1);
  const auto acc = acc_dtype(h);
  const auto acc_opts = h.options().dtype(acc);

  // validate everything before launching anything
  std::vector<Tensor> Ws;
  int64_t moments_size = 0;
  for (int64_t r = 0; r < R; ++r) {
    const std::string i = "[" + std::to_string(r) + "]";
    const Tensor& c = contexts[r];
    check_feature_map(c, ("contexts" + i).c_str());
    check_same_device(c, h, "contexts" + i, "h");
    TORCH_CHECK(c.scalar_type() == h.scalar_type(), "contsup: contexts", i, " must have h's dtype ",
                h.scalar_type(), ", got ", c.scalar_type());
    TORCH_CHECK(c.size(0) == N, "contsup: contexts", i, " has batch size ", c.size(0),
                " but h has batch size ", N);
    pool_factors(c, h, "contexts" + i, "h");
    const int64_t Cr = c.size(1);
    const Tensor& w = weights[r];
    TORCH_CHECK((w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1)) &&
                    w.size(0) == C && w.size(1) == Cr,
                "contsup: weights", i, " must have shape (", C, ", ", Cr, ") or (", C, ", ", Cr,
                ", 1, 1) (C = h's channels, C_r = contexts", i, "'s channels), got ", w.sizes());
    check_dtype(w, ("weights" + i).c_str());
    check_same_device(w, h, "weights" + i, "h");
    check_channel_vec(biases[r], C, "biases" + i, h, "h");
    check_channel_vec(bn_weights[r], C, "bn_weights" + i, h, "h");
    check_channel_vec(bn_biases[r], C, "bn_biases" + i, h, "h");
    check_channel_vec(running_means[r], C, "running_means" + i, h, "h");
    check_channel_vec(running_vars[r], C, "running_vars" + i, h, "h");
    check_training_count(c.numel() / Cr, training, ("the 1x1 conv output of contexts" + i).c_str());
    Ws.push_back(w.reshape({C, Cr}).to(acc).contiguous());
    moments_size += Cr + Cr * Cr;
  }

  Tensor out = at::empty_like(h);
  Tensor ctx_moments = at::zeros({moments_size}, acc_opts);
  std::vector<Tensor> means, vars;
  auto moments_pass = CONTSUP_PASS(moments, h.device());
  auto comoment_pass = CONTSUP_PASS(comoment, h.device());
  auto out_pass = CONTSUP_PASS(residual_out, h.device());
  int64_t off = 0;
  for (int64_t r = 0; r < R; ++r) {
    const Tensor& c = contexts[r];
    const int64_t Cr = c.size(1);
    const double M = static_cast<double>(c.numel() / Cr);
    const Tensor& W = Ws[r];
    const Tensor b = to_acc(biases[r], acc);
    Tensor mean_y, var_y;
    if (training) {
      Tensor m = moments_pass(c, Tensor()).div_(M);
      Tensor S = comoment_pass(c, m).div_(M);
      mean_y = at::addmv(b, W, m);
      var_y = (at::mm(W, S) * W).sum(1).clamp_min_(0);
      ctx_moments.narrow(0, off, Cr).copy_(m);
      ctx_moments.narrow(0, off + Cr, Cr * Cr).copy_(S.reshape({-1}));
    } else {
      mean_y = running_means[r].to(acc, false, true);
      var_y = running_vars[r].to(acc, false, true);
    }
    off += Cr + Cr * Cr;
    // fold BN into the conv: relu(A (W c + b) + B) = relu(W' c + b')
    Tensor A = to_acc(bn_weights[r], acc) * (var_y + eps).rsqrt();
    Tensor B = to_acc(bn_biases[r], acc) - mean_y * A;
    Tensor Wt = (W * A.unsqueeze(1)).t().contiguous();  // (Cr, C)
    Tensor bp = (A * b + B).contiguous();
    out_pass(c, Wt, bp, r == 0 ? h : out, out);
    means.push_back(mean_y);
    vars.push_back(var_y);
  }
  if (R == 0) out.copy_(h);
  Tensor means_t = R ? at::stack(means) : at::empty({0, C}, acc_opts);
  Tensor vars_t = R ? at::stack(vars) : at::empty({0, C}, acc_opts);
  return {out, means_t, vars_t, ctx_moments};
}

// Parameter gradients of residual_context (h and the contexts get none here; the Python
// autograd formula passes grad_out through to h). One pass over (c, grad_out) per term
// gathers G = sum_p g_a (c_p - m_c)^T (C x C_r) and Sg = sum_p g_a (C), recomputing
// y = W c + b and the ReLU mask on the fly; then, with A = gamma*rstd,
//   training: dbeta = Sg, dgamma = rstd * rowsum(W o G),
//             dW = A o (G - (dgamma*rstd) o (W S)),  db = 0  (exactly: sum of yhat is 0);
//   eval:     dbeta = Sg, dgamma = rstd * (rowsum(W o G) + (b - mu) Sg),
//             dW = A o G,  db = A Sg       (G uncentred).
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
residual_context_backward(const Tensor& grad_out_in, at::TensorList contexts, at::TensorList weights,
                          at::TensorList biases, at::TensorList bn_weights, at::TensorList bn_biases,
                          const Tensor& means, const Tensor& vars, const Tensor& ctx_moments,
                          bool training, double eps) {
  check_feature_map(grad_out_in, "grad_out");
  const int64_t R = static_cast<int64_t>(contexts.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == R && static_cast<int64_t>(biases.size()) == R &&
                  static_cast<int64_t>(bn_weights.size()) == R && static_cast<int64_t>(bn_biases.size()) == R,
              "contsup: contexts, weights, biases, bn_weights and bn_biases must have the same length");
  c10::OptionalDeviceGuard guard(grad_out_in.device());
  const int64_t C = grad_out_in.size(1);
  TORCH_CHECK(means.dim() == 2 && means.size(0) == R && means.size(1) == C && vars.sizes() == means.sizes(),
              "contsup: means and vars must have shape (", R, ", ", C, "), got ", means.sizes(), " and ",
              vars.sizes());
  std::vector<Tensor> dWs, dbs, dgs, dbetas;
  int64_t off = 0;
  auto bwd_pass = CONTSUP_PASS(residual_bwd_sums, grad_out_in.device());
  for (int64_t r = 0; r < R; ++r) {
    const std::string i = "[" + std::to_string(r) + "]";
    const Tensor& c = contexts[r];
    check_feature_map(c, ("contexts" + i).c_str());
    check_same_device(c, grad_out_in, "contexts" + i, "grad_out");
    pool_factors(c, grad_out_in, "contexts" + i, "grad_out");
    const int64_t Cr = c.size(1);
    TORCH_CHECK(weights[r].numel() == C * Cr, "contsup: weights", i, " must have C*C_r = ", C * Cr,
                " elements, got shape ", weights[r].sizes());
    TORCH_CHECK(ctx_moments.numel() >= off + Cr + Cr * Cr, "contsup: ctx_moments is too short (",
                ctx_moments.numel(), " elements) for the given contexts");
    const auto acc = acc_dtype(c);
    const Tensor grad_out = grad_out_in.scalar_type() == c.scalar_type() ? grad_out_in
                                                                         : grad_out_in.to(c.scalar_type());
    const Tensor W = weights[r].reshape({C, Cr}).to(acc).contiguous();
    const Tensor b = to_acc(biases[r], acc);
    const Tensor mean_y = to_acc(means[r], acc), var_y = to_acc(vars[r], acc);
    const Tensor rstd = (var_y + eps).rsqrt();
    const Tensor A = to_acc(bn_weights[r], acc) * rstd;
    const Tensor B = to_acc(bn_biases[r], acc) - mean_y * A;
    const Tensor Wt = (W * A.unsqueeze(1)).t().contiguous();
    const Tensor bp = (A * b + B).contiguous();
    const Tensor mom = ctx_moments.to(acc);
    const Tensor m = training ? mom.narrow(0, off, Cr).contiguous() : at::zeros({Cr}, b.options());
    Tensor G, Sg;
    std::tie(G, Sg) = bwd_pass(grad_out, c, Wt, bp, m);
    Tensor WG = (W * G).sum(1);
    Tensor dgamma, dW, db;
    if (training) {
      const Tensor S = mom.narrow(0, off + Cr, Cr * Cr).view({Cr, Cr});
      dgamma = rstd * WG;
      dW = A.unsqueeze(1) * (G - (dgamma * rstd).unsqueeze(1) * at::mm(W, S));
      db = at::zeros_like(Sg);
    } else {
      dgamma = rstd * (WG + (b - mean_y) * Sg);
      dW = A.unsqueeze(1) * G;
      db = A * Sg;
    }
    off += Cr + Cr * Cr;
    dWs.push_back(dW.reshape(weights[r].sizes()).to(weights[r].scalar_type()));
    dbs.push_back(db.to(biases[r].scalar_type()));
    dgs.push_back(dgamma.to(bn_weights[r].scalar_type()));
    dbetas.push_back(Sg.to(bn_biases[r].scalar_type(), false, true));
  }
  return {dWs, dbs, dgs, dbetas};
}

// ---------------------------------- op 5 --------------------------------------------
// image_context: out = h + avgpool_s(relu(bn(conv3x3(u, weight, bias, padding=1)))).
//   h (N, C, H, W); u (N, C_in, s*H, s*W) in h's dtype; weight (C, C_in, 3, 3); bias and
//   BN params / running stats (C,). The (N, C, s*H, s*W) convolution output z is never
//   materialised (forward or backward). Its batch statistics follow from the moments of the
//   K = 9*C_in zero-padded patches x_p (z_p = W x_p + b, W = weight.reshape(C, K)):
//     mean_z = W mu + b,   var_z = diag(W S W^T),   mu, S = patch mean, biased covariance.
//   Returns (out, mean, var, patch_moments) with patch_moments = [mu (K), S (K*K)] in
//   training (zeros in eval): what the backward needs besides u and the parameters.
namespace {

struct ImageContextParams {
  Tensor W, Wt, b;  // (C, K), (K, C), (C,) in acc dtype
};

ImageContextParams image_context_params(const Tensor& weight, const Tensor& bias, at::ScalarType acc) {
  const int64_t C = weight.size(0), K = weight.numel() / C;
  Tensor W = weight.reshape({C, K}).to(acc).contiguous();
  return {W, W.t().contiguous(), to_acc(bias, acc)};
}

void check_image_context_weight(const Tensor& weight, int64_t C, int64_t Ci, const Tensor& ref,
                                const char* ref_name) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == Ci && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "contsup: weight must have shape (", C, ", ", Ci, ", 3, 3) (C = h's channels, C_in = u's "
              "channels; a 3x3 convolution), got ", weight.sizes());
  check_dtype(weight, "weight");
  check_same_device(weight, ref, "weight", ref_name);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> image_context(const Tensor& h, const Tensor& u,
                                                         const Tensor& weight, const Tensor& bias,
                                                         const Tensor& bn_weight, const Tensor& bn_bias,
                                                         const Tensor& running_mean,
                                                         const Tensor& running_var, bool training,
                                                         double eps) {
  check_feature_map(h, "h");
  check_feature_map(u, "u");
  check_same_device(u, h, "u", "h");
  TORCH_CHECK(u.scalar_type() == h.scalar_type(), "contsup: u must have h's dtype ", h.scalar_type(),
              ", got ", u.scalar_type());
  TORCH_CHECK(u.size(0) == h.size(0), "contsup: u has batch size ", u.size(0), " but h has batch size ",
              h.size(0));
  pool_factors(u, h, "u", "h");
  const int64_t C = h.size(1), Ci = u.size(1), K = 9 * Ci;
  check_image_context_weight(weight, C, Ci, h, "h");
  check_channel_vec(bias, C, "bias", h, "h");
  check_bn_params(h, "h", bn_weight, bn_bias, running_mean, running_var, "running_mean", "running_var");
  check_training_count(u.numel() / Ci, training, "the 3x3 conv output of u");
  c10::OptionalDeviceGuard guard(h.device());
  const auto acc = acc_dtype(h);
  const auto p = image_context_params(weight, bias, acc);
  Tensor moments = at::zeros({K + K * K}, h.options().dtype(acc));
  Tensor mean, var;
  if (training) {
    const double M = static_cast<double>(u.numel() / Ci);
    Tensor mu = CONTSUP_PASS(patch_sum, u.device())(u).div_(M);
    Tensor S = CONTSUP_PASS(patch_comoment, u.device())(u, mu).div_(M);
    mean = at::addmv(p.b, p.W, mu);
    var = (at::mm(p.W, S) * p.W).sum(1).clamp_min_(0);
    moments.narrow(0, 0, K).copy_(mu);
    moments.narrow(0, K, K * K).copy_(S.reshape({-1}));
  } else {
    mean = running_mean.to(acc, false, true);
    var = running_var.to(acc, false, true);
  }
  const Tensor A = to_acc(bn_weight, acc) * (var + eps).rsqrt();
  const Tensor B = (to_acc(bn_bias, acc) - mean * A).contiguous();
  Tensor out = at::empty_like(h);
  CONTSUP_PASS(image_out, u.device())(u, p.Wt, p.b, A.contiguous(), B, h, out);
  return {out, mean, var, moments};
}

// Gradients (grad_u, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias) of image_context
// (h gets grad_out unchanged in the Python autograd formula). Two passes over (u, grad_out),
// both recomputing z per row/tile:
//   1. G = sum_p g_a (x_p - c)^T (C x K), Sg = sum_p g_a, with c = mu (training) or 0 (eval);
//      then, as for the residual context (rstd = 1/sqrt(var + eps), A = gamma*rstd):
//      training: dbeta = Sg, dgamma = rstd * rowsum(W o G),
//                dW = A o (G - (dgamma*rstd) o (W S)), db = 0;
//      eval:     dbeta = Sg, dgamma = rstd * (rowsum(W o G) + (b - mu_z) Sg), dW = A o G, db = A Sg;
//   2. dz_p = A g_a - Q - (z_p - mean) R (Q = A Sg / M, R = A rstd^2 rowsum(W o G) / M in
//      training, 0 in eval) and grad_u = conv3x3^T(dz), per tile with a 1-pixel halo.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> image_context_backward(
    const Tensor& grad_out_in, const Tensor& u, const Tensor& weight, const Tensor& bias,
    const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& mean_in, const Tensor& var_in,
    const Tensor& patch_moments, bool training, double eps) {
  check_feature_map(grad_out_in, "grad_out");
  check_feature_map(u, "u");
  check_same_device(grad_out_in, u, "grad_out", "u");
  TORCH_CHECK(grad_out_in.size(0) == u.size(0), "contsup: grad_out has batch size ", grad_out_in.size(0),
              " but u has batch size ", u.size(0));
  pool_factors(u, grad_out_in, "u", "grad_out");
  const int64_t C = grad_out_in.size(1), Ci = u.size(1), K = 9 * Ci;
  check_image_context_weight(weight, C, Ci, grad_out_in, "grad_out");
  check_channel_vec(bias, C, "bias", grad_out_in, "grad_out");
  check_bn_params(grad_out_in, "grad_out", bn_weight, bn_bias, mean_in, var_in, "mean", "var");
  TORCH_CHECK(patch_moments.dim() == 1 && patch_moments.numel() == K + K * K,
              "contsup: patch_moments must have shape (", K + K * K, ",) (K + K^2, K = 9*C_in), got ",
              patch_moments.sizes());
  check_training_count(u.numel() / Ci, training, "the 3x3 conv output of u");
  c10::OptionalDeviceGuard guard(u.device());
  const auto acc = acc_dtype(u);
  const double M = static_cast<double>(u.numel() / Ci);
  const Tensor grad = grad_out_in.scalar_type() == u.scalar_type() ? grad_out_in
                                                                   : grad_out_in.to(u.scalar_type());
  const auto p = image_context_params(weight, bias, acc);
  const Tensor mean = to_acc(mean_in, acc), var = to_acc(var_in, acc);
  const Tensor rstd = (var + eps).rsqrt();
  const Tensor A = (to_acc(bn_weight, acc) * rstd).contiguous();
  const Tensor B = (to_acc(bn_bias, acc) - mean * A).contiguous();
  const Tensor mom = patch_moments.to(acc);
  const Tensor center = training ? mom.narrow(0, 0, K).contiguous() : at::zeros({K}, p.b.options());
  Tensor G, Sg;
  std::tie(G, Sg) = CONTSUP_PASS(image_bwd_sums, u.device())(grad, u, p.Wt, p.b, A, B, center);
  const Tensor WG = (p.W * G).sum(1);
  Tensor dgamma, dW, db, Q, R;
  if (training) {
    const Tensor S = mom.narrow(0, K, K * K).view({K, K});
    dgamma = rstd * WG;
    dW = A.unsqueeze(1) * (G - (dgamma * rstd).unsqueeze(1) * at::mm(p.W, S));
    db = at::zeros_like(Sg);
    Q = (A * Sg).div_(M).contiguous();
    R = (A * rstd * rstd * WG).div_(M).contiguous();
  } else {
    dgamma = rstd * (WG + (p.b - mean) * Sg);
    dW = A.unsqueeze(1) * G;
    db = A * Sg;
    Q = at::zeros_like(Sg);
    R = at::zeros_like(Sg);
  }
  Tensor du = at::empty_like(u);
  CONTSUP_PASS(image_bwd_du, u.device())(grad, u, p.Wt, p.b, A, B, mean, Q, R, du);
  return {du, dW.reshape(weight.sizes()).to(weight.scalar_type()), db.to(bias.scalar_type()),
          dgamma.to(bn_weight.scalar_type()), Sg.to(bn_bias.scalar_type(), false, true)};
}

}  // namespace contsup

// ------------------------------------------------------------------------------------
// Registration
// ------------------------------------------------------------------------------------
// The library's namespace: torch.ops.contsup (the test-only CUDA-emulation build uses
// another one, -DCONTSUP_LIB=contsup_emu, so that both can be loaded in one process).
#ifndef CONTSUP_LIB
#define CONTSUP_LIB contsup
#endif
#define CONTSUP_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CONTSUP_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

CONTSUP_TORCH_LIBRARY(CONTSUP_LIB, m) {
  m.def("residual_context(Tensor h, Tensor[] contexts, Tensor[] weights, Tensor[] biases, "
        "Tensor[] bn_weights, Tensor[] bn_biases, Tensor[] running_means, Tensor[] running_vars, "
        "bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("residual_context_backward(Tensor grad_out, Tensor[] contexts, Tensor[] weights, "
        "Tensor[] biases, Tensor[] bn_weights, Tensor[] bn_biases, Tensor means, Tensor vars, "
        "Tensor ctx_moments, bool training, float eps) -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def("image_context_tail(Tensor h, Tensor z, Tensor bn_weight, Tensor bn_bias, "
        "Tensor running_mean, Tensor running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("image_context_tail_backward(Tensor grad_out, Tensor z, Tensor bn_weight, Tensor bn_bias, "
        "Tensor mean, Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("bn_relu_gap(Tensor z, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, "
        "Tensor running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("bn_relu_gap_backward(Tensor grad_pooled, Tensor z, Tensor bn_weight, Tensor bn_bias, "
        "Tensor mean, Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("global_avg_pool(Tensor h) -> Tensor");
  m.def("image_context(Tensor h, Tensor u, Tensor weight, Tensor bias, Tensor bn_weight, Tensor bn_bias, "
        "Tensor running_mean, Tensor running_var, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("image_context_backward(Tensor grad_out, Tensor u, Tensor weight, Tensor bias, Tensor bn_weight, "
        "Tensor bn_bias, Tensor mean, Tensor var, Tensor patch_moments, bool training, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("global_avg_pool_backward(Tensor grad_pooled, SymInt[] input_size, bool channels_last) -> Tensor");
}

#define CONTSUP_IMPL_ALL(m)                                                              \
  m.impl("residual_context", &contsup::residual_context);                                \
  m.impl("residual_context_backward", &contsup::residual_context_backward);              \
  m.impl("image_context_tail", &contsup::image_context_tail);                            \
  m.impl("image_context_tail_backward", &contsup::image_context_tail_backward);          \
  m.impl("bn_relu_gap", &contsup::bn_relu_gap);                                          \
  m.impl("bn_relu_gap_backward", &contsup::bn_relu_gap_backward);                        \
  m.impl("global_avg_pool", &contsup::global_avg_pool);                                  \
  m.impl("global_avg_pool_backward", &contsup::global_avg_pool_backward);                \
  m.impl("image_context", &contsup::image_context);                                      \
  m.impl("image_context_backward", &contsup::image_context_backward);

CONTSUP_TORCH_LIBRARY_IMPL(CONTSUP_LIB, CPU, m) { CONTSUP_IMPL_ALL(m) }

#ifdef CONTSUP_WITH_CUDA
// The CUDA dispatch key runs the same operator logic; the heavy passes are the kernels
// of contsup_ops_cuda.cu (selected by device in CONTSUP_PASS).
CONTSUP_TORCH_LIBRARY_IMPL(CONTSUP_LIB, CUDA, m) { CONTSUP_IMPL_ALL(m) }
#define CONTSUP_WITH_CUDA_FLAG 1
#else
#define CONTSUP_WITH_CUDA_FLAG 0
#endif

// Python module `contsup_fast._C`: importing it loads this library, which registers the
// torch.ops.contsup.* operators. `with_cuda` says whether CUDA kernels were compiled in.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "contsup_fast native kernels; importing registers the torch.ops.contsup operators.", -1,
      nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod != nullptr) PyModule_AddIntConstant(mod, "with_cuda", CONTSUP_WITH_CUDA_FLAG);
  return mod;
}
