// The 2-D FFT algorithm (kFft2): scatter into a half spectrum and one 2-D real FFT for dW; one rfft2
// and a gather for dL/dcoeffs from G.
#pragma once

#include <ATen/ops/fft_irfft2.h>
#include <ATen/ops/fft_rfft2.h>
#include <ATen/ops/zeros.h>

#include "cpu_common.h"
#include "cpu_plan.h"

namespace lfma_ext {
namespace cpu {

// ------------------------------------------------------------------------------ 2-D FFT, dW
template <typename T>
at::Tensor fft2_delta(const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n,
                      double s) {
  const int64_t half = n / 2 + 1;
  at::Tensor spectrum = at::zeros({m, half}, at::TensorOptions().dtype(complex_type<T>()));
  T* z = reinterpret_cast<T*>(spectrum.data_ptr());
  auto put = [&](int64_t u, int64_t j, double re, double im) {
    z[2 * (u * half + j)] += static_cast<T>(re);
    z[2 * (u * half + j) + 1] += static_cast<T>(im);
  };
  // The Hermitian part (F[u, v] + conj(F[-u, -v])) / 2, stored for columns v <= N/2.
  for (int64_t i = 0; i < k; ++i) {
    const int64_t u = rows[i], v = cols[i];
    const double a = 0.5 * s * static_cast<double>(coeffs[2 * i]);
    const double b = 0.5 * s * static_cast<double>(coeffs[2 * i + 1]);
    if (2 * v <= n) {
      put(u, v, a, b);
      if (v == 0 || 2 * v == n) put((m - u) % m, v, a, -b);
    } else {
      put((m - u) % m, n - v, a, -b);
    }
  }
  const std::vector<int64_t> size{m, n}, dims{0, 1};
  return at::fft_irfft2(spectrum, at::IntArrayRef(size), at::IntArrayRef(dims), "forward");
}

template <typename T>
void fft2_grad(const at::Tensor& grad_dw, const int64_t* rows, const int64_t* cols, int64_t k, double s, T* out) {
  const int64_t m = grad_dw.size(0), n = grad_dw.size(1), half = n / 2 + 1;
  const at::Tensor spectrum = at::fft_rfft2(grad_dw);
  const T* z = reinterpret_cast<const T*>(spectrum.const_data_ptr());
  for (int64_t i = 0; i < k; ++i) {
    const int64_t u = rows[i], v = cols[i];
    if (2 * v <= n) {
      out[2 * i] = static_cast<T>(s * z[2 * (u * half + v)]);
      out[2 * i + 1] = static_cast<T>(s * z[2 * (u * half + v) + 1]);
    } else {  // G is real: fft2(G)[u, v] = conj(fft2(G)[-u, -v])
      const int64_t at = ((m - u) % m) * half + (n - v);
      out[2 * i] = static_cast<T>(s * z[2 * at]);
      out[2 * i + 1] = static_cast<T>(-s * z[2 * at + 1]);
    }
  }
}

}  // namespace cpu
}  // namespace lfma_ext
