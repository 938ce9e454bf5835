// CPU passes, shared helpers: row gather/scatter between a 4-D tensor of any strides and a
// channel-contiguous buffer, the deterministic row reduction (fixed groups, ordered sums),
// and the grain of at::parallel_for. Included by the cpu_*.cpp passes (contract:
// contsup_ops.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "contsup_ops.h"

namespace contsup {
namespace cpu {
namespace {

using at::Tensor;

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

// grain (rows per task) so that a task has roughly >= 32k element operations
inline int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_row, 1));
}

}  // namespace
}  // namespace cpu
}  // namespace contsup
