// CUDA registrations of the lfma_ext ops defined in bindings.cpp: the extension lfma_kernels._C_cuda
// (this file + lfma_cuda.cu), built only with the CUDA part and loaded after lfma_kernels._C.
//
// Device-agnostic C++: no CUDA or c10/cuda headers. The current stream comes from c10's device
// guard interface (Stream::native_handle() is the cudaStream_t), workspaces from ATen's caching
// allocator, and the kernels behind the C launchers of lfma_cuda.h. So this file compiles against
// any torch build, and the extension links no torch CUDA library, only the CUDA runtime.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "lfma_checks.h"
#include "lfma_cuda.h"

namespace lfma_ext {

namespace {

cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return LFMA_FLOAT32;
    case at::kDouble: return LFMA_FLOAT64;
    case at::kBFloat16: return LFMA_BFLOAT16;
    case at::kHalf: return LFMA_FLOAT16;
    default: TORCH_CHECK(false, "lfma_ext: unsupported dtype ", t);
  }
}

void check_launch(const char* op, int err) {
  TORCH_CHECK(err == 0, op, ": CUDA kernel launch failed: ", lfma_cuda_error_string(err));
}

// out = weight + dW (weight undefined: out = dW) with the kernel; out's dtype must pair with the
// coefficients' (float32 coeffs: float32/bfloat16/float16 out; float64 coeffs: float64 out).
void launch_delta(const char* op, const Frequencies& f, int64_t d_out, int64_t d_in, double alpha,
                  const at::Tensor& weight, at::Tensor& out) {
  const double s = alpha / (static_cast<double>(d_out) * static_cast<double>(d_in));
  const at::Device device = out.device();
  check_launch(op, lfma_cuda_delta_weight(f.coeffs.const_data_ptr(), f.rows.const_data_ptr<int64_t>(),
                                          f.cols.const_data_ptr<int64_t>(), f.rows.size(0), d_out, d_in, s,
                                          weight.defined() ? weight.const_data_ptr() : nullptr, out.data_ptr(),
                                          dtype_code(f.coeffs.scalar_type()), dtype_code(out.scalar_type()),
                                          current_stream(device)));
}

at::Tensor delta_weight_cuda(const at::Tensor& coeffs, const at::Tensor& rows, const at::Tensor& cols, int64_t d_out,
                             int64_t d_in, double alpha, int64_t algo) {
  const char* op = "lfma_ext::delta_weight";
  const Frequencies f = check_delta_weight_args(op, coeffs, rows, cols, d_out, d_in, algo);
  const c10::DeviceGuard guard(coeffs.device());
  at::Tensor out = at::empty({d_out, d_in}, f.coeffs.options());
  launch_delta(op, f, d_out, d_in, alpha, at::Tensor(), out);
  return out;
}

at::Tensor folded_weight_cuda(const at::Tensor& weight, const at::Tensor& coeffs, const at::Tensor& rows,
                              const at::Tensor& cols, double alpha, int64_t algo) {
  const char* op = "lfma_ext::folded_weight";
  const WeightAndFrequencies a = check_folded_weight_args(op, weight, coeffs, rows, cols, algo);
  const at::Tensor& w = a.weight;
  const Frequencies& f = a.f;
  const c10::DeviceGuard guard(weight.device());
  const int64_t d_out = w.size(0), d_in = w.size(1);
  const bool acc64 = f.coeffs.scalar_type() == at::kDouble;
  if (acc64 == (w.scalar_type() == at::kDouble)) {  // a pair the kernel fuses
    at::Tensor out = at::empty_like(w);
    launch_delta(op, f, d_out, d_in, alpha, w, out);
    return out;
  }
  // Mixed pairs (float64 coefficients on a lower-precision weight, or float32 coefficients on a
  // float64 weight): fold in float64, then round once to the weight's dtype.
  Frequencies f64 = f;
  f64.coeffs = f.coeffs.to(at::kDouble);
  const at::Tensor wide = w.to(at::kDouble);
  at::Tensor out = at::empty_like(wide);
  launch_delta(op, f64, d_out, d_in, alpha, wide, out);
  return out.to(w.scalar_type());
}

at::Tensor coeff_grad_cuda(const at::Tensor& grad_dw, const at::Tensor& rows, const at::Tensor& cols, double alpha,
                           int64_t algo) {
  const char* op = "lfma_ext::coeff_grad";
  const WeightAndFrequencies a = check_coeff_grad_args(op, grad_dw, rows, cols, algo);
  const at::Tensor& g = a.weight;
  const Frequencies& f = a.f;
  const c10::DeviceGuard guard(grad_dw.device());
  const int64_t k = f.rows.size(0), d_out = g.size(0), d_in = g.size(1);
  const int code = dtype_code(g.scalar_type());
  at::Tensor out = at::empty({k, 2}, g.options());
  if (k == 0) return out;
  const size_t bytes = lfma_cuda_coeff_grad_workspace(k, d_out, d_in, code);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, g.options().dtype(at::kByte));
  const double s = alpha / (static_cast<double>(d_out) * static_cast<double>(d_in));
  check_launch(op, lfma_cuda_coeff_grad(g.const_data_ptr(), f.rows.const_data_ptr<int64_t>(),
                                        f.cols.const_data_ptr<int64_t>(), k, d_out, d_in, s, out.data_ptr(),
                                        workspace.data_ptr(), code, current_stream(g.device())));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lfma_ext, CUDA, m) {
  m.impl("delta_weight", &delta_weight_cuda);
  m.impl("folded_weight", &folded_weight_cuda);
  m.impl("coeff_grad", &coeff_grad_cuda);
}

}  // namespace lfma_ext
