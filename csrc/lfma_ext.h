// Internal declarations shared by the bindings (bindings.cpp, cuda_bindings.cpp) and the CPU
// kernels (cpu_kernels.cpp, cpu_plan.cpp). The CUDA kernels have their own torch-free header, lfma_cuda.h.
#pragma once

#include <array>
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace lfma_ext {

// How dW (and dL/dcoeffs from G) is evaluated on CPU; see cpu_kernels.cpp for what each does and
// cpu_plan.cpp for what each costs and where each wins.
enum Algo : int64_t {
  kAuto = -1,       // the cost model of choose_algo
  kSeparable = 0,   // rank-2K product with exact-phase tables, d_out*d_in*2K multiply-adds
  kHybrid = 1,      // rows evaluated directly from the K frequencies (K*d_out), columns by real FFTs
  kFft2 = 2,        // scatter into a half spectrum, one 2-D real FFT
};

// The CPU cost model (cpu_plan.cpp). choose_algo: the algorithm kAuto resolves to for K frequencies
// forming `terms` distinct hybrid terms in `columns` distinct half-spectrum columns (negative: K, and
// what that many random frequencies touch on average) on a d_out x d_in weight. `inverse`: building
// dW (irfft); otherwise reading dL/dcoeffs from G (rfft). algo_costs: its estimates (nanoseconds on
// the project's 2-core CPU) for {separable, hybrid, fft2}. count_terms: {terms, columns} of actual
// positions as a call counts them, or {-1, -1} where a call does not count them (large K).
int64_t choose_algo(int64_t k, int64_t terms, int64_t columns, int64_t d_out, int64_t d_in, bool inverse);
std::array<double, 3> algo_costs(int64_t k, int64_t terms, int64_t columns, int64_t d_out, int64_t d_in, bool inverse);
std::array<int64_t, 2> count_terms(const int64_t* rows, const int64_t* cols, int64_t k, int64_t d_out, int64_t d_in);

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
