// The ten operators of torch.ops.contsup (schemas in op_registration.cpp, Python wrappers,
// fake kernels and autograd in contsup_fast/_native.py), defined in op_bn_relu_pool.cpp,
// op_residual_context.cpp and op_image_context.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace contsup {

using at::Tensor;

// op 1 (op_residual_context.cpp)
std::tuple<Tensor, Tensor, Tensor, Tensor> residual_context(
    const Tensor& h, at::TensorList contexts, at::TensorList weights, at::TensorList biases,
    at::TensorList bn_weights, at::TensorList bn_biases, at::TensorList running_means,
    at::TensorList running_vars, bool training, double eps);
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
residual_context_backward(const Tensor& grad_out_in, at::TensorList contexts, at::TensorList weights,
                          at::TensorList biases, at::TensorList bn_weights, at::TensorList bn_biases,
                          const Tensor& means, const Tensor& vars, const Tensor& ctx_moments,
                          bool training, double eps);

// ops 2, 3 and 4 (op_bn_relu_pool.cpp)
std::tuple<Tensor, Tensor, Tensor> image_context_tail(const Tensor& h, const Tensor& z,
                                                      const Tensor& bn_weight, const Tensor& bn_bias,
                                                      const Tensor& running_mean,
                                                      const Tensor& running_var, bool training,
                                                      double eps);
std::tuple<Tensor, Tensor, Tensor> image_context_tail_backward(const Tensor& grad_out, const Tensor& z,
                                                               const Tensor& bn_weight,
                                                               const Tensor& bn_bias,
                                                               const Tensor& mean, const Tensor& var,
                                                               bool training, double eps);
std::tuple<Tensor, Tensor, Tensor> bn_relu_gap(const Tensor& z, const Tensor& bn_weight,
                                               const Tensor& bn_bias, const Tensor& running_mean,
                                               const Tensor& running_var, bool training, double eps);
std::tuple<Tensor, Tensor, Tensor> bn_relu_gap_backward(const Tensor& grad_pooled, const Tensor& z,
                                                        const Tensor& bn_weight, const Tensor& bn_bias,
                                                        const Tensor& mean, const Tensor& var,
                                                        bool training, double eps);
Tensor global_avg_pool(const Tensor& h);
Tensor global_avg_pool_backward(const Tensor& grad_pooled, at::IntArrayRef input_size, bool channels_last);

// op 5 (op_image_context.cpp)
std::tuple<Tensor, Tensor, Tensor, Tensor> image_context(const Tensor& h, const Tensor& u,
                                                         const Tensor& weight, const Tensor& bias,
                                                         const Tensor& bn_weight, const Tensor& bn_bias,
                                                         const Tensor& running_mean,
                                                         const Tensor& running_var, bool training,
                                                         double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> image_context_backward(
    const Tensor& grad_out_in, const Tensor& u, const Tensor& weight, const Tensor& bias,
    const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& mean_in, const Tensor& var_in,
    const Tensor& patch_moments, bool training, double eps);

}  // namespace contsup
