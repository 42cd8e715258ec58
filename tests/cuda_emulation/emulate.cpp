// Runs csrc/lfma_cuda.cu -- the CUDA kernels and their C launchers, unchanged -- on CPU threads, so
// that machines without a GPU still test the kernels' indexing, tiling, shared-memory staging,
// reductions and dtype conversions against the float64 oracle (tests/test_cuda_emulation.py).
//
// Each block runs as blockDim.x*y*z OS threads; __syncthreads() is a std::barrier; __shared__
// variables are function statics (blocks run one after another, so each block sees its own);
// sincospi/sincospif are evaluated in long double; bfloat16/float16 round to nearest even. What
// this cannot show: timing, occupancy, races the barrier hides, and nvcc code generation (CI
// compiles the real thing with nvcc for sm_80 and sm_90).
//
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -I csrc tests/cuda_emulation/emulate.cpp -o libemu.so
#define LFMA_CUDA_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

// ---------------------------------------------------------------------------- CUDA built-ins
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace lfma_emu {
thread_local uint3 thread_idx, block_idx;
thread_local dim3 block_dim, grid_dim;
thread_local std::barrier<>* block_barrier = nullptr;
}  // namespace lfma_emu

#define threadIdx (::lfma_emu::thread_idx)
#define blockIdx (::lfma_emu::block_idx)
#define blockDim (::lfma_emu::block_dim)
#define gridDim (::lfma_emu::grid_dim)

inline void __syncthreads() { lfma_emu::block_barrier->arrive_and_wait(); }

inline void sincospif(float x, float* s, float* c) {
  const long double a = 3.141592653589793238462643383279502884L * x;
  *s = static_cast<float>(std::sin(a));
  *c = static_cast<float>(std::cos(a));
}
inline void sincospi(double x, double* s, double* c) {
  const long double a = 3.141592653589793238462643383279502884L * x;
  *s = static_cast<double>(std::sin(a));
  *c = static_cast<double>(std::cos(a));
}
using std::fma;

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
struct __half {
  _Float16 value;
};
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }

// ---------------------------------------------------------------------------- kernel launch
namespace lfma_emu {

// LFMA_LAUNCH(grid, block, stream, kernel)(args...): every block in turn, its threads in parallel.
template <typename... P>
auto launch(dim3 grid, dim3 block, void (*kernel)(P...)) {
  return [=](auto... args) {
    const unsigned n = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::barrier<> barrier(n);
          std::vector<std::thread> threads;
          threads.reserve(n);
          for (unsigned t = 0; t < n; ++t) {
            threads.emplace_back([&, t] {
              thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
              block_idx = {bx, by, bz};
              block_dim = block;
              grid_dim = grid;
              block_barrier = &barrier;
              kernel(args...);
            });
          }
          for (auto& th : threads) th.join();
        }
  };
}

}  // namespace lfma_emu

#define LFMA_LAUNCH(grid, block, stream, ...) ::lfma_emu::launch(grid, block, __VA_ARGS__)

// ---------------------------------------------------------------------------- the real thing
#include "lfma_cuda.cu"
