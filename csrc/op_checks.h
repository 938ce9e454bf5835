// contsup_fast native backend, device-agnostic operator logic: shared argument checks and
// helpers of the op_*.cpp files (the operators are declared in operators.h, registered in
// op_registration.cpp). The fused "boundary" ops of ContSup (greedy local learning with
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
// (eval: dy = A*g_a). See the individual ops (op_*.cpp) for what each saves.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <utility>

#include "contsup_ops.h"

namespace contsup {
namespace {

using at::Tensor;

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

void check_training_count(int64_t M, bool training, const char* name) {
  TORCH_CHECK(!training || M > 1, "contsup: expected more than 1 value per channel when training "
              "(BatchNorm over ", name, "), got ", M);
}

inline void check_bn_params(const Tensor& z, const char* zname, const Tensor& gamma, const Tensor& beta,
                            const Tensor& m, const Tensor& v, const char* mname, const char* vname) {
  const int64_t C = z.size(1);
  check_channel_vec(gamma, C, "bn_weight", z, zname);
  check_channel_vec(beta, C, "bn_bias", z, zname);
  check_channel_vec(m, C, mname, z, zname);
  check_channel_vec(v, C, vname, z, zname);
}

}  // namespace
}  // namespace contsup
