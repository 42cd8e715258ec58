// CUDA kernels of the lfma_ext ops, behind the plain C launchers of lfma_cuda.h. No torch
// headers: `nvcc -c lfma_cuda.cu` builds this file on any machine with the CUDA toolkit.
//
// dW / W + dW: one 256-thread block per 64x64 output tile, 4x4 outputs per thread. K is walked
// in chunks; per chunk the block evaluates the exact-phase tables it needs into shared memory:
//   L1[k][m] = s (a_k cos phi - b_k sin phi),  L2[k][m] = -s (a_k sin phi + b_k cos phi),
//   Bc[k][n] = cos psi,  Bs[k][n] = sin psi,    phi = 2 pi (m u_k mod M)/M, psi = 2 pi (n v_k mod N)/N,
// then accumulates dW[m, n] += L1[k][m] Bc[k][n] + L2[k][m] Bs[k][n] in registers (float32, or
// float64 for float64 coefficients) and writes W + dW (or dW) once, converted to the output type.
// The phase is reduced in integers before sincospi, so float32 tables are accurate to ~2e-7.
//
// dL/dcoeffs from G: block (k chunk, 32-row tile) computes Tc[m, k] = sum_n G[m, n] cos psi and
// Ts (sin) over all columns with G and the column tables staged in shared memory, then folds in
// the row phase, (cos phi - i sin phi)(Tc - i Ts), reduces its rows and writes one partial per
// (row tile, k); a second kernel adds the partials in a fixed order (deterministic, no atomics).
//
// Kernel launches go through LFMA_LAUNCH(grid, block, stream, kernel)(args...). With nvcc that is
// kernel<<<grid, block, 0, stream>>>(args...); tests/cuda_emulation/ defines LFMA_CUDA_EMULATION,
// supplies the CUDA built-ins and runs this very file on CPU threads.
#ifndef LFMA_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define LFMA_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif
#include <stdint.h>

#include "lfma_cuda.h"
#include "lfma_cuda_kernels.cuh"

namespace {

using namespace lfma_cuda;

bool sizes_ok(int64_t k, int64_t d_out, int64_t d_in) {
  return k >= 0 && k < (int64_t{1} << 31) && d_out >= 1 && d_in >= 1 && d_out < (int64_t{1} << 30) &&
         d_in < (int64_t{1} << 30);
}

template <typename Acc, typename Out>
int launch_delta_weight(const void* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t d_out,
                        int64_t d_in, double scale, const void* weight, void* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((d_in + kTile - 1) / kTile),
                  static_cast<unsigned>((d_out + kTile - 1) / kTile));
  if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 block(16, 16);
  LFMA_LAUNCH(grid, block, stream, delta_weight_kernel<Acc, Out>)(
      static_cast<const Acc*>(coeffs), rows, cols, static_cast<int>(k), static_cast<int>(d_out),
      static_cast<int>(d_in), static_cast<Acc>(scale), static_cast<const Out*>(weight), static_cast<Out*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_coeff_grad(const void* grad_dw, const int64_t* rows, const int64_t* cols, int64_t k, int64_t d_out,
                      int64_t d_in, double scale, void* out, void* workspace, cudaStream_t stream) {
  if (k == 0) return 0;
  constexpr int KC = GradChunk<T>::value;
  const int64_t tiles = (d_out + kGradRows - 1) / kGradRows;
  if (tiles > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((k + KC - 1) / KC), static_cast<unsigned>(tiles));
  T* partial = static_cast<T*>(workspace);
  LFMA_LAUNCH(grid, dim3(kThreads), stream, coeff_grad_partial_kernel<T>)(
      static_cast<const T*>(grad_dw), rows, cols, static_cast<int>(k), static_cast<int>(d_out),
      static_cast<int>(d_in), partial);
  const int err = static_cast<int>(cudaGetLastError());
  if (err != 0) return err;
  const int threads = 128;
  LFMA_LAUNCH(dim3(static_cast<unsigned>((k + threads - 1) / threads)), dim3(threads), stream,
              coeff_grad_finish_kernel<T>)(
      partial, static_cast<int>(tiles), static_cast<int>(k), scale, static_cast<T*>(out));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int lfma_cuda_delta_weight(const void* coeffs, const int64_t* rows, const int64_t* cols, int64_t k,
                                      int64_t d_out, int64_t d_in, double scale, const void* weight, void* out,
                                      int acc_dtype, int out_dtype, cudaStream_t stream) {
  if (!sizes_ok(k, d_out, d_in)) return static_cast<int>(cudaErrorInvalidValue);
  if (acc_dtype == LFMA_FLOAT32) {
    switch (out_dtype) {
      case LFMA_FLOAT32:
        return launch_delta_weight<float, float>(coeffs, rows, cols, k, d_out, d_in, scale, weight, out, stream);
      case LFMA_BFLOAT16:
        return launch_delta_weight<float, __nv_bfloat16>(coeffs, rows, cols, k, d_out, d_in, scale, weight, out,
                                                         stream);
      case LFMA_FLOAT16:
        return launch_delta_weight<float, __half>(coeffs, rows, cols, k, d_out, d_in, scale, weight, out, stream);
      default:
        break;
    }
  } else if (acc_dtype == LFMA_FLOAT64 && out_dtype == LFMA_FLOAT64) {
    return launch_delta_weight<double, double>(coeffs, rows, cols, k, d_out, d_in, scale, weight, out, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

extern "C" size_t lfma_cuda_coeff_grad_workspace(int64_t k, int64_t d_out, int64_t d_in, int dtype) {
  (void)d_in;
  if (k <= 0 || d_out <= 0) return 0;
  const size_t elem = dtype == LFMA_FLOAT64 ? sizeof(double) : sizeof(float);
  const size_t tiles = static_cast<size_t>((d_out + kGradRows - 1) / kGradRows);
  return tiles * static_cast<size_t>(k) * 2 * elem;
}

extern "C" int lfma_cuda_coeff_grad(const void* grad_dw, const int64_t* rows, const int64_t* cols, int64_t k,
                                    int64_t d_out, int64_t d_in, double scale, void* out, void* workspace, int dtype,
                                    cudaStream_t stream) {
  if (!sizes_ok(k, d_out, d_in)) return static_cast<int>(cudaErrorInvalidValue);
  if (dtype == LFMA_FLOAT32)
    return launch_coeff_grad<float>(grad_dw, rows, cols, k, d_out, d_in, scale, out, workspace, stream);
  if (dtype == LFMA_FLOAT64)
    return launch_coeff_grad<double>(grad_dw, rows, cols, k, d_out, d_in, scale, out, workspace, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

extern "C" const char* lfma_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
