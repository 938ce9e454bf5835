// CPU passes of the residual-context op (1x1 convolution, never materialised): comoment,
// residual_out, residual_bwd_sums (contract: contsup_ops.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "contsup_ops.h"
#include "cpu_gemm.h"
#include "cpu_rows.h"

namespace contsup {
namespace cpu {

using at::Tensor;

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

}  // namespace cpu
}  // namespace contsup
