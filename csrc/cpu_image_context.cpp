// CPU passes of the image-context op (3x3 convolution with padding 1, never materialised):
// patch_sum, patch_comoment, image_out, image_bwd_sums, image_bwd_du (contract:
// contsup_ops.h).

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
}  // namespace contsup
