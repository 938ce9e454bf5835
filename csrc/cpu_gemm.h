// CPU passes: the small register-blocked dense product gemm_acc (C += op(A) B) used by the
// residual-context and image-context passes; fp32 picks an AVX2+FMA micro-kernel at run
// time. Header-only (internal linkage) so each pass file inlines it.
#pragma once

#include <cstdint>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace contsup {
namespace cpu {
namespace {

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

}  // namespace
}  // namespace cpu
}  // namespace contsup
