// Test-only translation unit: the CUDA passes of cuda_*.cu compiled as C++ with the CPU
// emulation of csrc/cuda_emulation.h. Built on demand by the tests (never by setup.py)
// together with the other csrc/*.cpp files, with -DCONTSUP_CUDA_EMULATION -DCONTSUP_LIB=contsup_emu
// so that the ops register as torch.ops.contsup_emu.* and run the CUDA code on CPU tensors.
// (One translation unit: the .cu files share cuda_common.cuh, included once.)
#include "cuda_bn_pool.cu"
#include "cuda_residual_context.cu"
#include "cuda_image_context.cu"
