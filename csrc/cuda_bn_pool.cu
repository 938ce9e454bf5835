// CUDA passes of the BatchNorm -> ReLU -> average-pool ops and of the channel moments:
// moments, pool_bn_relu, pool_bwd_sums, pool_bwd_dz (contract: contsup_ops.h), built on a
// deterministic two-stage per-channel reduction and memory-order element-wise kernels.
#include "cuda_common.cuh"

namespace contsup {
namespace cuda {
namespace {

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

}  // namespace cuda
}  // namespace contsup
