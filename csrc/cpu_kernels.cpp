// CPU kernels of the lfma_ext ops: dW, W + dW and dL/dcoeffs from G = dL/d(dW).
//
//   dW[m, n] = s * sum_k Re(c_k exp(2 pi i (m u_k / M + n v_k / N))),   s = alpha / (M N),
//   dL/dc_k  = s * fft2(G)[u_k, v_k]   (as (real, imag)),                M = d_out, N = d_in.
//
// Three algorithms, all with the phase reduced exactly in integers ((m u) mod M) before a table
// lookup (a float32 angle 2 pi m u / M would lose ~1e-4 at M = 768):
//
//   kSeparable  the rank-2K product dW = L R^T, L = s [Ac a - As b, -(As a + Ac b)] [M, 2K],
//               R = [Bc, Bs] [N, 2K]: one MKL GEMM (addmm onto W for W + dW), 2K*M*N multiply-adds;
//               for K <= 2 (dW) / K <= 4 (gradient) fused loops that write the output in one pass.
//   kHybrid     rows direct, columns by FFT: for every row m, each frequency's term
//               c_k exp(2 pi i m u_k / M) goes into column v_k of a half spectrum Z [M, N/2+1] (a
//               frequency past N/2 enters as the conjugate of its mirror, so each touches exactly one
//               column; the two members of a conjugate pair, which top-K selection on a real matrix
//               always picks together, land on the same term and are merged), then one batch of M
//               real inverse FFTs of length N along the rows: T*M + ~M*N*log2(N) for T distinct
//               terms (T <= K). The gradient mirrors it: one batch of row rffts of G, then each term
//               reduces its column against exp(-2 pi i m u / M).
//   kFft2       scatter the K coefficients (and their conjugate mirrors) into the half spectrum and
//               run one 2-D real FFT: ~M*N*log2(M*N) whatever K.
//
// Which algorithm runs is the Python planner's choice, passed as algo (its cost model:
// lfma_kernels/ops/backends/cpp.py; cpu_plan.cpp builds what that algorithm needs); each algorithm is in
// a header of its own: cpu_separable.h, cpu_hybrid.h, cpu_fft2.h,
// and the layer backward's batch path in cpu_batch.h (helpers in cpu_common.h).
//
// Threads: ATen's at::parallel_for, i.e. OpenMP in torch's own runtime (torch's libgomp is
// already loaded when the extension is, so there is one thread pool and torch.set_num_threads
// applies). Inner loops are written for `#pragma omp simd`; the hybrid's block loops need no
// gathers, so they vectorise with the baseline x86-64 ISA the extension is compiled for (no
// per-ISA builds; the FFTs and GEMMs are MKL's, dispatched at run time).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include "cpu_batch.h"
#include "cpu_delta.h"
#include "cpu_fft2.h"
#include "cpu_hybrid.h"
#include "cpu_plan.h"
#include "cpu_separable.h"
#include "lfma_ext.h"

namespace lfma_ext {

using namespace cpu;

namespace {

template <typename T>
at::Tensor fft_delta(const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n,
                     double s, const Plan& plan) {
  return plan.algo == kHybrid ? hybrid_delta<T>(coeffs, plan.terms, k, m, n, s)
                              : fft2_delta<T>(coeffs, rows, cols, k, m, n, s);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// entry points (inputs validated by the bindings)
// ---------------------------------------------------------------------------------------------
at::Tensor delta_weight_cpu(const at::Tensor& coeffs, const at::Tensor& rows, const at::Tensor& cols,
                            int64_t d_out, int64_t d_in, double alpha, int64_t algo) {
  const int64_t k = rows.size(0);
  const double s = alpha / (static_cast<double>(d_out) * static_cast<double>(d_in));
  if (k == 0) return at::zeros({d_out, d_in}, coeffs.options());
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* v = cols.const_data_ptr<int64_t>();
  const Plan plan = make_plan(algo, r, v, k, d_out, d_in, true);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "lfma_ext::delta_weight", [&] {
    const scalar_t* c = coeffs.const_data_ptr<scalar_t>();
    if (plan.algo == kSeparable && !plan.fused_loops) {
      out = separable_gemm<scalar_t>(c, r, v, k, d_out, d_in, s, at::Tensor());
    } else if (plan.algo == kSeparable) {
      out = at::empty({d_out, d_in}, coeffs.options());
      separable_fold<scalar_t, scalar_t>(c, r, v, k, d_out, d_in, s, nullptr, out.data_ptr<scalar_t>());
    } else {
      out = fft_delta<scalar_t>(c, r, v, k, d_out, d_in, s, plan);
    }
  });
  return out;
}

at::Tensor folded_weight_cpu(const at::Tensor& weight, const at::Tensor& coeffs, const at::Tensor& rows,
                             const at::Tensor& cols, double alpha, int64_t algo) {
  const int64_t d_out = weight.size(0), d_in = weight.size(1), k = rows.size(0);
  const double s = alpha / (static_cast<double>(d_out) * static_cast<double>(d_in));
  if (k == 0) return weight.clone();
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* v = cols.const_data_ptr<int64_t>();
  const Plan plan = make_plan(algo, r, v, k, d_out, d_in, true);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "lfma_ext::folded_weight", [&] {
    using acc_t = scalar_t;
    const acc_t* c = coeffs.const_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lfma_ext::folded_weight", [&] {
      using w_t = scalar_t;
      if (plan.algo == kSeparable && !plan.fused_loops) {
        out = separable_gemm<acc_t>(c, r, v, k, d_out, d_in, s, weight);
      } else if (plan.algo == kSeparable) {
        out = at::empty_like(weight);
        separable_fold<acc_t, w_t>(c, r, v, k, d_out, d_in, s, weight.const_data_ptr<w_t>(), out.data_ptr<w_t>());
      } else {
        out = fold<acc_t, w_t>(weight, fft_delta<acc_t>(c, r, v, k, d_out, d_in, s, plan));
      }
    });
  });
  return out;
}

at::Tensor coeff_grad_cpu(const at::Tensor& grad_dw, const at::Tensor& rows, const at::Tensor& cols, double alpha,
                          int64_t algo) {
  const int64_t d_out = grad_dw.size(0), d_in = grad_dw.size(1), k = rows.size(0);
  const double s = alpha / (static_cast<double>(d_out) * static_cast<double>(d_in));
  at::Tensor out = at::empty({k, 2}, grad_dw.options());
  if (k == 0) return out;
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* v = cols.const_data_ptr<int64_t>();
  const Plan plan = make_plan(algo, r, v, k, d_out, d_in, false);
  AT_DISPATCH_FLOATING_TYPES(grad_dw.scalar_type(), "lfma_ext::coeff_grad", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (plan.algo == kSeparable && !plan.fused_loops) {
      separable_gemm_grad<scalar_t>(grad_dw, r, v, k, s, o);
    } else if (plan.algo == kSeparable) {
      separable_grad<scalar_t>(grad_dw.const_data_ptr<scalar_t>(), r, v, k, d_out, d_in, s, o);
    } else if (plan.algo == kHybrid) {
      hybrid_grad<scalar_t>(grad_dw, plan.terms, k, s, o);
    } else {
      fft2_grad<scalar_t>(grad_dw, r, v, k, s, o);
    }
  });
  return out;
}

at::Tensor coeff_grad_batch_cpu(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& rows,
                                const at::Tensor& cols, double alpha) {
  const int64_t d_out = grad_out.size(1), d_in = x.size(1), k = rows.size(0);
  const double s = alpha / (static_cast<double>(d_out) * static_cast<double>(d_in));
  at::Tensor out = at::zeros({k, 2}, x.options());
  if (k == 0 || x.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lfma_ext::coeff_grad_batch", [&] {
    batch_fft_grad<scalar_t>(x, grad_out, rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(), k, s,
                             out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor delta_rows_cpu(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& rows, const at::Tensor& cols,
                          double alpha, int64_t d_out) {
  const int64_t d_in = x.size(1), k = rows.size(0);
  const double s = alpha / (static_cast<double>(d_out) * static_cast<double>(d_in));
  at::Tensor out = at::zeros({x.size(0), d_out}, x.options());
  if (k == 0 || x.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lfma_ext::delta_rows", [&] {
    delta_rows<scalar_t>(x, coeffs.const_data_ptr<scalar_t>(), rows.const_data_ptr<int64_t>(),
                         cols.const_data_ptr<int64_t>(), k, d_out, s, out);
  });
  return out;
}

at::Tensor delta_rows_grouped_cpu(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& rows,
                                  const at::Tensor& cols, const std::vector<int64_t>& k_counts,
                                  const std::vector<int64_t>& t_counts, const std::vector<double>& alphas,
                                  int64_t d_out) {
  const int64_t d_in = x.size(1);
  std::vector<double> s;
  for (double alpha : alphas) s.push_back(alpha / (static_cast<double>(d_out) * static_cast<double>(d_in)));
  at::Tensor out = at::zeros({x.size(0), d_out}, x.options());
  if (x.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lfma_ext::delta_rows_grouped", [&] {
    delta_rows_grouped<scalar_t>(x, coeffs.const_data_ptr<scalar_t>(), rows.const_data_ptr<int64_t>(),
                                 cols.const_data_ptr<int64_t>(), k_counts, t_counts, s, d_out, out);
  });
  return out;
}

}  // namespace lfma_ext
