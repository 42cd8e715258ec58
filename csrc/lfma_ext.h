// Internal declarations shared by the bindings (bindings.cpp, cuda_bindings.cpp) and the CPU
// kernels (cpu_kernels.cpp, cpu_plan.cpp). The CUDA kernels have their own torch-free header, lfma_cuda.h.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace lfma_ext {

// How dW (and dL/dcoeffs from G) is evaluated on CPU, as the Python planner chose; see cpu_kernels.cpp
// for what each does and lfma_kernels/ops/backends/cpp.py for what each costs and where each wins.
enum Algo : int64_t {
  kSeparable = 0,   // rank-2K product with exact-phase tables, d_out*d_in*2K multiply-adds
  kHybrid = 1,      // rows evaluated directly from the K frequencies (K*d_out), columns by real FFTs
  kFft2 = 2,        // scatter into a half spectrum, one 2-D real FFT
};

// CPU kernels. Inputs are validated and made contiguous by the bindings: coeffs [K, 2] float32 or
// float64 (the accumulation type), rows/cols int64 [K] in range, weight/grad_dw 2-D.
at::Tensor delta_weight_cpu(const at::Tensor& coeffs, const at::Tensor& rows, const at::Tensor& cols,
                            int64_t d_out, int64_t d_in, double alpha, int64_t algo);
at::Tensor folded_weight_cpu(const at::Tensor& weight, const at::Tensor& coeffs, const at::Tensor& rows,
                             const at::Tensor& cols, double alpha, int64_t algo);
at::Tensor coeff_grad_cpu(const at::Tensor& grad_dw, const at::Tensor& rows, const at::Tensor& cols,
                          double alpha, int64_t algo);
// dL/dcoeffs [K, 2] from the layer's input x [T, d_in] and output gradient grad_out [T, d_out], both
// contiguous in the accumulation dtype, without forming G = grad_out^T x (row FFTs, see the kernel).
at::Tensor coeff_grad_batch_cpu(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& rows,
                                const at::Tensor& cols, double alpha);
// x dW^T [T, d_out] from token rows x [T, d_in] (contiguous, the accumulation dtype) and coeffs [K, 2] in
// the same dtype, without W: row FFTs (see cpu_delta.h). The delta path beside a quantized base layer.
at::Tensor delta_rows_cpu(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& rows, const at::Tensor& cols,
                          double alpha, int64_t d_out);
// The same for several adapters at once: x's rows grouped by adapter (t_counts[g] rows each), their
// frequencies concatenated (k_counts[g] each), one alpha each (see cpu_delta.h).
at::Tensor delta_rows_grouped_cpu(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& rows,
                                  const at::Tensor& cols, const std::vector<int64_t>& k_counts,
                                  const std::vector<int64_t>& t_counts, const std::vector<double>& alphas,
                                  int64_t d_out);

}  // namespace lfma_ext
