/* Plain C launchers of the LFMA CUDA kernels (lfma_cuda.cu).
 *
 * No torch and no CUDA headers: the bindings (cuda_bindings.cpp) include this with any C++
 * compiler, and `nvcc -c lfma_cuda.cu` compiles the kernels on any machine. All pointers are
 * device pointers to contiguous row-major arrays; every launcher enqueues on `stream` and
 * returns 0 (cudaSuccess) or the cudaError_t code of the failed launch.
 *
 *   dW[m, n] = scale * sum_k (a_k cos(theta) - b_k sin(theta)),
 *   theta    = 2 pi ((m u_k mod d_out) / d_out + (n v_k mod d_in) / d_in),  (a_k, b_k) = coeffs[k]
 *
 * Indices are reduced modulo d_out / d_in in the kernels (never used to address memory), so
 * out-of-range values cannot fault; the Python entry points reject them before launch.
 */
#ifndef LFMA_CUDA_H_
#define LFMA_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The same declaration as CUDA's driver_types.h (a repeated identical typedef is valid C11/C++). */
typedef struct CUstream_st* cudaStream_t;

typedef enum {
  LFMA_FLOAT32 = 0,
  LFMA_FLOAT64 = 1,
  LFMA_BFLOAT16 = 2,
  LFMA_FLOAT16 = 3
} lfma_dtype_t;

/* out = weight + dW (or dW alone when weight is NULL), shape [d_out, d_in].
 * coeffs [k, 2] in acc_dtype; weight and out in out_dtype. Supported pairs:
 *   acc LFMA_FLOAT32 with out LFMA_FLOAT32, LFMA_BFLOAT16 or LFMA_FLOAT16 (float32 accumulation);
 *   acc LFMA_FLOAT64 with out LFMA_FLOAT64.
 * Any other pair returns cudaErrorInvalidValue without launching. */
int lfma_cuda_delta_weight(const void* coeffs, const int64_t* rows, const int64_t* cols, int64_t k,
                           int64_t d_out, int64_t d_in, double scale, const void* weight, void* out,
                           int acc_dtype, int out_dtype, cudaStream_t stream);

/* Bytes of device workspace lfma_cuda_coeff_grad needs (per-row-tile partial sums). */
size_t lfma_cuda_coeff_grad_workspace(int64_t k, int64_t d_out, int64_t d_in, int dtype);

/* out [k, 2] = scale * (Re, Im) fft2(grad_dw)[u_k, v_k]
 *            = scale * (sum G cos(theta), -sum G sin(theta)),
 * grad_dw [d_out, d_in] and out in dtype (LFMA_FLOAT32 or LFMA_FLOAT64). Deterministic: the
 * row tiles write partial sums to `workspace`, a second kernel adds them in a fixed order. */
int lfma_cuda_coeff_grad(const void* grad_dw, const int64_t* rows, const int64_t* cols, int64_t k, int64_t d_out,
                         int64_t d_in, double scale, void* out, void* workspace, int dtype, cudaStream_t stream);

/* cudaGetErrorString, so that callers need no CUDA headers. */
const char* lfma_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* LFMA_CUDA_H_ */
