// The lfma_ext operator library: schemas, input validation, and the CPU kernels' registration.
// The CUDA kernels register for the same ops from a second library (cuda_bindings.cpp +
// lfma_cuda.cu, the extension lfma_kernels._C_cuda), built only where CUDA is; fake
// implementations are registered from Python (lfma_kernels/ops/cpp_ops.py), autograd by
// lfma_kernels/ops/library.py and linear_op.py on the lfma:: ops that run these.
//
//   lfma_ext::delta_weight(coeffs, rows, cols, d_out, d_in, alpha, algo) -> dW [d_out, d_in]
//       float32, or float64 for float64 coeffs
//   lfma_ext::folded_weight(weight, coeffs, rows, cols, alpha, algo) -> W + dW in W's dtype
//   lfma_ext::coeff_grad(grad_dw, rows, cols, alpha, algo) -> dL/dcoeffs [K, 2], float32/float64
//   lfma_ext::coeff_grad_batch(x, grad_out, rows, cols, alpha) -> dL/dcoeffs [K, 2] of F.linear(x, W + dW)
//       from x [T, d_in] and grad_out [T, d_out] without forming G (CPU only)
//   lfma_ext::delta_rows(x, coeffs, rows, cols, alpha, d_out) -> x dW^T [T, d_out] from x [T, d_in] without W,
//       by row FFTs (CPU only; the delta path beside a quantized base, lfma_kernels/ops/delta_kernels.py)
//   lfma_ext::delta_rows_grouped(x, coeffs, rows, cols, k_counts, t_counts, alphas, d_out) -> the same for
//       several adapters in one call: x's rows grouped by adapter (t_counts), their frequencies concatenated
//       (k_counts), one alpha each (CPU only; a mixed-adapter batch, lfma_kernels/peft/mixed_batch.py)
//
// `algo` is the CPU algorithm the Python planner chose (0 separable, 1 hybrid, 2 2-D FFT; see
// cpu_kernels.cpp; what each costs is lfma_kernels/ops/backends/cpp.py's) and is ignored on CUDA.
#include <vector>

#include <torch/library.h>

#include "lfma_ext.h"
#include "lfma_checks.h"

namespace lfma_ext {

namespace {

at::Tensor delta_weight_cpu_op(const at::Tensor& coeffs, const at::Tensor& rows, const at::Tensor& cols,
                               int64_t d_out, int64_t d_in, double alpha, int64_t algo) {
  const char* op = "lfma_ext::delta_weight";
  const Frequencies f = check_delta_weight_args(op, coeffs, rows, cols, d_out, d_in, algo);
  check_range_cpu(op, f, d_out, d_in);
  return delta_weight_cpu(f.coeffs, f.rows, f.cols, d_out, d_in, alpha, algo);
}

at::Tensor folded_weight_cpu_op(const at::Tensor& weight, const at::Tensor& coeffs, const at::Tensor& rows,
                                const at::Tensor& cols, double alpha, int64_t algo) {
  const char* op = "lfma_ext::folded_weight";
  const WeightAndFrequencies a = check_folded_weight_args(op, weight, coeffs, rows, cols, algo);
  check_range_cpu(op, a.f, a.weight.size(0), a.weight.size(1));
  return folded_weight_cpu(a.weight, a.f.coeffs, a.f.rows, a.f.cols, alpha, algo);
}

at::Tensor coeff_grad_cpu_op(const at::Tensor& grad_dw, const at::Tensor& rows, const at::Tensor& cols,
                             double alpha, int64_t algo) {
  const char* op = "lfma_ext::coeff_grad";
  const WeightAndFrequencies a = check_coeff_grad_args(op, grad_dw, rows, cols, algo);
  check_range_cpu(op, a.f, a.weight.size(0), a.weight.size(1));
  return coeff_grad_cpu(a.weight, a.f.rows, a.f.cols, alpha, algo);
}

at::Tensor coeff_grad_batch_cpu_op(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& rows,
                                   const at::Tensor& cols, double alpha) {
  const char* op = "lfma_ext::coeff_grad_batch";
  const char* names[2] = {"x", "grad_out"};
  const at::Tensor* in[2] = {&x, &grad_out};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(in[i]->dim() == 2, op, ": ", names[i], " must be 2-D [tokens, features], got shape ", in[i]->sizes());
    TORCH_CHECK(is_real_float(in[i]->scalar_type()), op, ": ", names[i],
                " must be float16, bfloat16, float32 or float64, got ", in[i]->scalar_type());
    check_device(op, names[i], *in[i], x.device());
  }
  TORCH_CHECK(x.size(0) == grad_out.size(0), op, ": x and grad_out must have the same number of tokens, got ",
              x.size(0), " and ", grad_out.size(0));
  check_size(op, grad_out.size(1), x.size(1));
  const Frequencies f = check_indices(op, rows, cols, x.device());
  check_range_cpu(op, f, grad_out.size(1), x.size(1));
  const at::ScalarType t = compute_type(c10::promoteTypes(x.scalar_type(), grad_out.scalar_type()));
  return coeff_grad_batch_cpu(x.to(t).contiguous(), grad_out.to(t).contiguous(), f.rows, f.cols, alpha);
}

// Token rows x [T, d_in] of a real float dtype, and frequencies in range for a (d_out, d_in) weight.
Frequencies check_token_rows(const char* op, const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& rows,
                             const at::Tensor& cols, int64_t d_out) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, d_in], got shape ", x.sizes());
  TORCH_CHECK(is_real_float(x.scalar_type()), op, ": x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  check_size(op, d_out, x.size(1));
  const Frequencies f = check_frequencies(op, coeffs, rows, cols, x.device());
  check_range_cpu(op, f, d_out, x.size(1));
  return f;
}

at::Tensor delta_rows_cpu_op(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& rows,
                             const at::Tensor& cols, double alpha, int64_t d_out) {
  const Frequencies f = check_token_rows("lfma_ext::delta_rows", x, coeffs, rows, cols, d_out);
  const at::ScalarType t = f.coeffs.scalar_type();
  return delta_rows_cpu(x.to(t).contiguous(), f.coeffs, f.rows, f.cols, alpha, d_out);
}

at::Tensor delta_rows_grouped_cpu_op(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& rows,
                                     const at::Tensor& cols, at::IntArrayRef k_counts, at::IntArrayRef t_counts,
                                     at::ArrayRef<double> alphas, int64_t d_out) {
  const char* op = "lfma_ext::delta_rows_grouped";
  const Frequencies f = check_token_rows(op, x, coeffs, rows, cols, d_out);
  TORCH_CHECK(k_counts.size() == t_counts.size() && k_counts.size() == alphas.size(), op,
              ": k_counts, t_counts and alphas need one entry per adapter, got ", k_counts.size(), ", ",
              t_counts.size(), " and ", alphas.size());
  int64_t k_total = 0, t_total = 0;
  for (size_t g = 0; g < k_counts.size(); ++g) {
    TORCH_CHECK(k_counts[g] >= 0 && t_counts[g] >= 0, op, ": negative count for adapter ", g);
    k_total += k_counts[g];
    t_total += t_counts[g];
  }
  TORCH_CHECK(k_total == f.rows.size(0), op, ": k_counts add up to ", k_total, " but there are ", f.rows.size(0),
              " frequencies");
  TORCH_CHECK(t_total == x.size(0), op, ": t_counts add up to ", t_total, " but x has ", x.size(0), " rows");
  const at::ScalarType t = f.coeffs.scalar_type();
  return delta_rows_grouped_cpu(x.to(t).contiguous(), f.coeffs, f.rows, f.cols, k_counts.vec(), t_counts.vec(),
                                alphas.vec(), d_out);
}

}  // namespace

TORCH_LIBRARY(lfma_ext, m) {
  // Where the fake (meta) implementations live; torch imports it when it needs them.
  m.set_python_module("lfma_kernels.ops.cpp_ops");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("delta_weight(Tensor coeffs, Tensor rows, Tensor cols, int d_out, int d_in, float alpha, int algo) "
        "-> Tensor",
        tags);
  m.def("folded_weight(Tensor weight, Tensor coeffs, Tensor rows, Tensor cols, float alpha, int algo) -> Tensor",
        tags);
  m.def("coeff_grad(Tensor grad_dw, Tensor rows, Tensor cols, float alpha, int algo) -> Tensor", tags);
  m.def("coeff_grad_batch(Tensor x, Tensor grad_out, Tensor rows, Tensor cols, float alpha) -> Tensor", tags);
  m.def("delta_rows(Tensor x, Tensor coeffs, Tensor rows, Tensor cols, float alpha, int d_out) -> Tensor", tags);
  m.def("delta_rows_grouped(Tensor x, Tensor coeffs, Tensor rows, Tensor cols, int[] k_counts, int[] t_counts, "
        "float[] alphas, int d_out) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(lfma_ext, CPU, m) {
  m.impl("delta_weight", &delta_weight_cpu_op);
  m.impl("folded_weight", &folded_weight_cpu_op);
  m.impl("coeff_grad", &coeff_grad_cpu_op);
  m.impl("coeff_grad_batch", &coeff_grad_batch_cpu_op);
  m.impl("delta_rows", &delta_rows_cpu_op);
  m.impl("delta_rows_grouped", &delta_rows_grouped_cpu_op);
}

}  // namespace lfma_ext
