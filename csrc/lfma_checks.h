// Input validation shared by the CPU and CUDA bindings: every bad input raises a TORCH_CHECK
// error (RuntimeError in Python) that names the op and the argument, before anything is written.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lfma_ext {

// Validated inputs: coeffs [K, 2] contiguous in the accumulation dtype, rows/cols int64 [K] contiguous.
struct Frequencies {
  at::Tensor coeffs, rows, cols;
};

// dW accumulates in float32, or float64 when the coefficients are float64.
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool is_real_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_size(const char* op, int64_t d_out, int64_t d_in) {
  TORCH_CHECK(d_out >= 1 && d_in >= 1, op, ": d_out and d_in must be positive, got ", d_out, " x ", d_in);
  // Phases are reduced in 32-bit integers: (m * u) mod d with m, u < d < 2^30.
  TORCH_CHECK(d_out < (int64_t{1} << 30) && d_in < (int64_t{1} << 30), op,
              ": d_out and d_in must be below 2^30, got ", d_out, " x ", d_in);
}

inline void check_algo(const char* op, int64_t algo) {
  TORCH_CHECK(algo >= 0 && algo <= 2, op, ": algo must be 0 (separable), 1 (hybrid) or 2 (2-D FFT), got ", algo);
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": all inputs must be on one device, but ", name, " is on ", t.device(),
              " and the others on ", device);
}

inline Frequencies check_indices(const char* op, const at::Tensor& rows, const at::Tensor& cols,
                                 const at::Device& device) {
  const char* names[2] = {"rows", "cols"};
  const at::Tensor* idx[2] = {&rows, &cols};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(idx[i]->dim() == 1 && idx[i]->scalar_type() == at::kLong, op, ": ", names[i],
                " must be a 1-D int64 tensor, got shape ", idx[i]->sizes(), " dtype ", idx[i]->scalar_type());
    check_device(op, names[i], *idx[i], device);
  }
  TORCH_CHECK(rows.size(0) == cols.size(0), op, ": rows and cols must have the same length K, got ", rows.size(0),
              " and ", cols.size(0));
  return {at::Tensor(), rows.contiguous(), cols.contiguous()};
}

inline Frequencies check_frequencies(const char* op, const at::Tensor& coeffs, const at::Tensor& rows,
                                     const at::Tensor& cols, const at::Device& device) {
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(1) == 2, op,
              ": coeffs must have shape [K, 2] (real, imag), got ", coeffs.sizes());
  TORCH_CHECK(is_real_float(coeffs.scalar_type()), op,
              ": coeffs must be a real floating-point tensor (float16, bfloat16, float32 or float64), got ",
              coeffs.scalar_type());
  check_device(op, "coeffs", coeffs, device);
  Frequencies f = check_indices(op, rows, cols, device);
  TORCH_CHECK(rows.size(0) == coeffs.size(0), op, ": rows, cols and coeffs must have the same length K, got ",
              rows.size(0), ", ", cols.size(0), " and ", coeffs.size(0));
  f.coeffs = coeffs.to(compute_type(coeffs.scalar_type())).contiguous();
  return f;
}

// A weight or G = dL/d(dW): 2-D, non-empty, real floating point; returned contiguous.
inline at::Tensor check_weight(const char* op, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(weight.dim() == 2, op, ": ", name, " must be 2-D [d_out, d_in], got shape ", weight.sizes());
  check_size(op, weight.size(0), weight.size(1));
  TORCH_CHECK(is_real_float(weight.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", weight.scalar_type());
  return weight.contiguous();
}

// The arguments of each op, validated as both the CPU and the CUDA bindings take them.
inline Frequencies check_delta_weight_args(const char* op, const at::Tensor& coeffs, const at::Tensor& rows,
                                           const at::Tensor& cols, int64_t d_out, int64_t d_in, int64_t algo) {
  check_size(op, d_out, d_in);
  check_algo(op, algo);
  return check_frequencies(op, coeffs, rows, cols, coeffs.device());
}

struct WeightAndFrequencies {
  at::Tensor weight;  // the weight, or G = dL/d(dW), contiguous
  Frequencies f;
};

inline WeightAndFrequencies check_folded_weight_args(const char* op, const at::Tensor& weight, const at::Tensor& coeffs,
                                                     const at::Tensor& rows, const at::Tensor& cols, int64_t algo) {
  check_algo(op, algo);
  at::Tensor w = check_weight(op, weight, "weight");
  return {w, check_frequencies(op, coeffs, rows, cols, weight.device())};
}

// G in the accumulation dtype (float32, or float64 for float64 G); f.coeffs is undefined.
inline WeightAndFrequencies check_coeff_grad_args(const char* op, const at::Tensor& grad_dw, const at::Tensor& rows,
                                                  const at::Tensor& cols, int64_t algo) {
  check_algo(op, algo);
  at::Tensor g = check_weight(op, grad_dw, "grad_dw").to(compute_type(grad_dw.scalar_type()));
  return {g, check_indices(op, rows, cols, grad_dw.device())};
}

// Index range check on host memory (CPU only: on a GPU it would need a device sync; the public
// Python entry points check ranges once, and the CUDA kernels reduce indices modulo the size).
inline void check_range_cpu(const char* op, const Frequencies& f, int64_t d_out, int64_t d_in) {
  const int64_t k = f.rows.size(0);
  const int64_t* r = f.rows.const_data_ptr<int64_t>();
  const int64_t* c = f.cols.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < d_out, op, ": rows must lie in [0, d_out = ", d_out, "), found ", r[i],
                " at index ", i);
    TORCH_CHECK(c[i] >= 0 && c[i] < d_in, op, ": cols must lie in [0, d_in = ", d_in, "), found ", c[i],
                " at index ", i);
  }
}

}  // namespace lfma_ext
