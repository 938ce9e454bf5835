// Operator residual_context (op 1) and its backward: h + sum_r avgpool(relu(bn(conv1x1(c_r))))
// with BN statistics from the moments of the contexts (device-agnostic; the heavy passes are
// cpu_residual_context.cpp / cuda_residual_context.cu).

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

}  // namespace contsup
