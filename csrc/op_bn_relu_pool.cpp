// Operators image_context_tail (op 2), bn_relu_gap (op 3) and global_avg_pool (op 4), with
// their backward: BatchNorm -> ReLU -> average pool, sharing one forward and one backward
// (device-agnostic; the heavy passes are cpu_bn_pool.cpp / cuda_bn_pool.cu).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <string>
#include <tuple>
#include <vector>

#include "contsup_ops.h"
#include "op_checks.h"
#include "operators.h"

namespace contsup {

using at::Tensor;

namespace {

// BatchNorm statistics of z over (N, H, W): two deterministic passes (mean, then centred
// second moment) -- avoids the cancellation of E[z^2] - E[z]^2.
std::tuple<Tensor, Tensor> channel_stats(const Tensor& z) {
  const double M = static_cast<double>(z.numel() / z.size(1));
  auto moments = CONTSUP_PASS(moments, z.device());
  Tensor mean = moments(z, Tensor()).div_(M);
  Tensor var = moments(z, mean).div_(M);
  return {mean, var};
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

}  // namespace contsup
