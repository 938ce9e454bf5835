// Operator image_context (op 5) and its backward: h + avgpool(relu(bn(conv3x3(u)))) with BN
// statistics from the patch moments of u (device-agnostic; the heavy passes are
// cpu_image_context.cpp / cuda_image_context.cu).

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
