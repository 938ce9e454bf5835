// Test-only translation unit: the CUDA passes of contsup_ops_cuda.cu compiled as C++ with the
// CPU emulation of csrc/cuda_emulation.h. Built on demand by the tests (never by setup.py)
// together with contsup_ops.cpp, with -DCONTSUP_CUDA_EMULATION -DCONTSUP_LIB=contsup_emu so
// that the ops register as torch.ops.contsup_emu.* and run the CUDA code on CPU tensors.
#include "contsup_ops_cuda.cu"
