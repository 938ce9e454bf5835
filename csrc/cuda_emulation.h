// Test-only CUDA emulation: lets the CUDA passes (cuda_*.cu) compile as plain C++ (with
// CONTSUP_CUDA_EMULATION defined, see csrc/cuda_emulation.cpp) so that its kernels --
// indexing, tiling, shared-memory staging, synchronisation -- run on CPU tensors and can be
// compared with the CPU kernels on machines without a GPU (tests/test_native_image_context.py).
//
// Model: blocks run one after another; the threads of a block are std::threads that share
// the kernel's `static` (= __shared__) variables and meet at a std::barrier in
// __syncthreads(). Slow (one OS thread per CUDA thread): for small test shapes only. It does
// not model warps, memory coalescing, or shared-memory size limits.
#pragma once

#include <barrier>
#include <thread>
#include <vector>

#if !defined(CONTSUP_CUDA_EMULATION)
#error "cuda_emulation.h is only for the CONTSUP_CUDA_EMULATION test build"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

namespace contsup {
namespace emu {

inline thread_local dim3 thread_idx, block_idx;
inline std::barrier<>* block_barrier = nullptr;

// kernel<<<grid, block>>>(args...) == launch(grid, block, &kernel)(args...)
template <typename... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    const unsigned nt = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::barrier<> bar(nt);
          block_barrier = &bar;
          std::vector<std::thread> threads;
          threads.reserve(nt);
          for (unsigned t = 0; t < nt; ++t)
            threads.emplace_back([&, t, bx, by, bz] {
              thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
              block_idx = dim3(bx, by, bz);
              kernel(static_cast<P>(args)...);
              bar.arrive_and_drop();  // finished threads no longer hold the others back
            });
          for (auto& th : threads) th.join();
          block_barrier = nullptr;
        }
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, kernel};
}

}  // namespace emu
}  // namespace contsup

#define threadIdx (::contsup::emu::thread_idx)
#define blockIdx (::contsup::emu::block_idx)
inline void __syncthreads() { ::contsup::emu::block_barrier->arrive_and_wait(); }
#define CONTSUP_LAUNCH(grid, block, ...) ::contsup::emu::launch(dim3(grid), dim3(block), &__VA_ARGS__)
