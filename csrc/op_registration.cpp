// Registration of the torch.ops.contsup operators (schemas, CPU and CUDA implementations)
// and the Python module contsup_fast._C whose import loads them.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <Python.h>

#include "operators.h"

// ------------------------------------------------------------------------------------
// Registration
// ------------------------------------------------------------------------------------
// The library's namespace: torch.ops.contsup (the test-only CUDA-emulation build uses
// another one, -DCONTSUP_LIB=contsup_emu, so that both can be loaded in one process).
#ifndef CONTSUP_LIB
#define CONTSUP_LIB contsup
#endif
#define CONTSUP_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define CONTSUP_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

CONTSUP_TORCH_LIBRARY(CONTSUP_LIB, m) {
  m.def("residual_context(Tensor h, Tensor[] contexts, Tensor[] weights, Tensor[] biases, "
        "Tensor[] bn_weights, Tensor[] bn_biases, Tensor[] running_means, Tensor[] running_vars, "
        "bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("residual_context_backward(Tensor grad_out, Tensor[] contexts, Tensor[] weights, "
        "Tensor[] biases, Tensor[] bn_weights, Tensor[] bn_biases, Tensor means, Tensor vars, "
        "Tensor ctx_moments, bool training, float eps) -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def("image_context_tail(Tensor h, Tensor z, Tensor bn_weight, Tensor bn_bias, "
        "Tensor running_mean, Tensor running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("image_context_tail_backward(Tensor grad_out, Tensor z, Tensor bn_weight, Tensor bn_bias, "
        "Tensor mean, Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("bn_relu_gap(Tensor z, Tensor bn_weight, Tensor bn_bias, Tensor running_mean, "
        "Tensor running_var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("bn_relu_gap_backward(Tensor grad_pooled, Tensor z, Tensor bn_weight, Tensor bn_bias, "
        "Tensor mean, Tensor var, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("global_avg_pool(Tensor h) -> Tensor");
  m.def("image_context(Tensor h, Tensor u, Tensor weight, Tensor bias, Tensor bn_weight, Tensor bn_bias, "
        "Tensor running_mean, Tensor running_var, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("image_context_backward(Tensor grad_out, Tensor u, Tensor weight, Tensor bias, Tensor bn_weight, "
        "Tensor bn_bias, Tensor mean, Tensor var, Tensor patch_moments, bool training, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("global_avg_pool_backward(Tensor grad_pooled, SymInt[] input_size, bool channels_last) -> Tensor");
}

#define CONTSUP_IMPL_ALL(m)                                                              \
  m.impl("residual_context", &contsup::residual_context);                                \
  m.impl("residual_context_backward", &contsup::residual_context_backward);              \
  m.impl("image_context_tail", &contsup::image_context_tail);                            \
  m.impl("image_context_tail_backward", &contsup::image_context_tail_backward);          \
  m.impl("bn_relu_gap", &contsup::bn_relu_gap);                                          \
  m.impl("bn_relu_gap_backward", &contsup::bn_relu_gap_backward);                        \
  m.impl("global_avg_pool", &contsup::global_avg_pool);                                  \
  m.impl("global_avg_pool_backward", &contsup::global_avg_pool_backward);                \
  m.impl("image_context", &contsup::image_context);                                      \
  m.impl("image_context_backward", &contsup::image_context_backward);

CONTSUP_TORCH_LIBRARY_IMPL(CONTSUP_LIB, CPU, m) { CONTSUP_IMPL_ALL(m) }

#ifdef CONTSUP_WITH_CUDA
// The CUDA dispatch key runs the same operator logic; the heavy passes are the kernels
// of cuda_*.cu (selected by device in CONTSUP_PASS).
CONTSUP_TORCH_LIBRARY_IMPL(CONTSUP_LIB, CUDA, m) { CONTSUP_IMPL_ALL(m) }
#define CONTSUP_WITH_CUDA_FLAG 1
#else
#define CONTSUP_WITH_CUDA_FLAG 0
#endif

// Python module `contsup_fast._C`: importing it loads this library, which registers the
// torch.ops.contsup.* operators. `with_cuda` says whether CUDA kernels were compiled in.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "contsup_fast native kernels; importing registers the torch.ops.contsup operators.", -1,
      nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod != nullptr) PyModule_AddIntConstant(mod, "with_cuda", CONTSUP_WITH_CUDA_FLAG);
  return mod;
}
