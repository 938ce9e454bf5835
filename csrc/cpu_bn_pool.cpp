// CPU passes of the BatchNorm -> ReLU -> average-pool ops (image_context_tail, bn_relu_gap,
// global_avg_pool) and of the channel moments: moments, pool_bn_relu, pool_bwd_sums,
// pool_bwd_dz (contract: contsup_ops.h; at::parallel_for loops over rows).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "contsup_ops.h"
#include "cpu_rows.h"

namespace contsup {
namespace cpu {

using at::Tensor;

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

}  // namespace cpu
}  // namespace contsup
