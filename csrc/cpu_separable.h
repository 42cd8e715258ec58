// The separable algorithm (kSeparable): dW = L R^T, the rank-2K product of exact-phase tables, as
// fused loops for tiny K or one MKL GEMM (addmm onto W for W + dW); and dL/dcoeffs from G likewise.
#pragma once

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include "cpu_common.h"
#include "cpu_plan.h"

namespace lfma_ext {
namespace cpu {

template <typename T>
std::vector<T> column_tables(const int64_t* cols, int64_t k, int64_t n) {
  std::vector<T> tc, ts;
  phase_table(n, tc, ts);
  std::vector<T> b(2 * k * n);
  at::parallel_for(0, k, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t q = k0; q < k1; ++q) {
      int64_t r = 0;
      const int64_t v = cols[q];
      for (int64_t x = 0; x < n; ++x) {
        b[q * n + x] = tc[r];
        b[(k + q) * n + x] = ts[r];
        r += v;
        if (r >= n) r -= n;
      }
    }
  });
  return b;
}

// out = weight + dW (weight may be null: out = dW), W the output type, T the accumulation type.
template <typename T, typename W>
void separable_fold(const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n,
                    double s, const W* weight, W* out) {
  const std::vector<T> b = column_tables<T>(cols, k, n);
  std::vector<T> tc, ts;
  phase_table(m, tc, ts);
  const int64_t k2 = 2 * k;
  std::vector<T> left(m * k2);  // [m][2k]: s (Ac a - As b), -s (As a + Ac b)
  at::parallel_for(0, m, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t row = m0; row < m1; ++row) {
      for (int64_t q = 0; q < k; ++q) {
        const int64_t t = (row * rows[q]) % m;
        const double c = tc[t], sn = ts[t];
        const double a = coeffs[2 * q], bq = coeffs[2 * q + 1];
        left[row * k2 + q] = static_cast<T>(s * (a * c - bq * sn));
        left[row * k2 + k + q] = static_cast<T>(-s * (a * sn + bq * c));
      }
    }
  });
  const T* bp = b.data();
  const int64_t blocks = (m + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 8192 / (n * (k2 + 1)) + 1);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(4 * n);
    T* a0 = acc.data();
    T* a1 = a0 + n;
    T* a2 = a1 + n;
    T* a3 = a2 + n;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * 4, nr = std::min<int64_t>(4, m - r0);
      for (int64_t i = 0; i < 4; ++i) {
        T* a = a0 + i * n;
        if (i < nr && weight != nullptr) {
          const W* w = weight + (r0 + i) * n;
          for (int64_t x = 0; x < n; ++x) a[x] = static_cast<T>(w[x]);
        } else {
          std::fill(a, a + n, T(0));
        }
      }
      const T* l0 = left.data() + r0 * k2;
      const T* l1 = l0 + (nr > 1 ? k2 : 0);
      const T* l2 = l0 + (nr > 2 ? 2 * k2 : 0);
      const T* l3 = l0 + (nr > 3 ? 3 * k2 : 0);
      for (int64_t q = 0; q < k2; ++q) {
        const T* bq = bp + q * n;
        const T c0 = l0[q], c1 = l1[q], c2 = l2[q], c3 = l3[q];
#pragma omp simd
        for (int64_t x = 0; x < n; ++x) {
          const T v = bq[x];
          a0[x] += c0 * v;
          a1[x] += c1 * v;
          a2[x] += c2 * v;
          a3[x] += c3 * v;
        }
      }
      for (int64_t i = 0; i < nr; ++i) {
        W* o = out + (r0 + i) * n;
        const T* a = a0 + i * n;
        for (int64_t x = 0; x < n; ++x) o[x] = static_cast<W>(a[x]);
      }
    }
  });
}

// W + dW in W's type, the add in T; reuses dW's buffer when the types agree.
template <typename T, typename W>
at::Tensor fold(const at::Tensor& weight, at::Tensor delta) {
  const int64_t numel = weight.numel();
  const W* w = weight.const_data_ptr<W>();
  T* d = delta.data_ptr<T>();
  if constexpr (std::is_same<T, W>::value) {
    at::parallel_for(0, numel, 32768, [&](int64_t i0, int64_t i1) {
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) d[i] += w[i];
    });
    return delta;
  } else {
    at::Tensor out = at::empty_like(weight);
    W* o = out.data_ptr<W>();
    at::parallel_for(0, numel, 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<W>(static_cast<T>(w[i]) + d[i]);
    });
    return out;
  }
}

// The separable factors for a GEMM: L [m, 2k] = s [Ac a - As b, -(As a + Ac b)] and R [n, 2k] =
// [Bc, Bs], exact-phase tables walked by residue recurrences (no division per entry).
template <typename T>
void separable_factors(const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n,
                       double s, at::Tensor* left, at::Tensor* right) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t k2 = 2 * k;
  std::vector<T> tc, ts;
  if (left != nullptr) {
    phase_table(m, tc, ts);
    *left = at::empty({m, k2}, options);
    T* l = left->data_ptr<T>();
    for_residues(m, rows, k, m, std::max<int64_t>(1, 4096 / k2), [&](int64_t row, int64_t q, int64_t r) {
      const double c = tc[r], sn = ts[r];
      const double a = coeffs[2 * q], b = coeffs[2 * q + 1];
      l[row * k2 + q] = static_cast<T>(s * (a * c - b * sn));
      l[row * k2 + k + q] = static_cast<T>(-s * (a * sn + b * c));
    });
  }
  phase_table(n, tc, ts);
  *right = at::empty({n, k2}, options);
  T* rt = right->data_ptr<T>();
  for_residues(n, cols, k, n, std::max<int64_t>(1, 4096 / k2), [&](int64_t x, int64_t q, int64_t r) {
    rt[x * k2 + q] = tc[r];
    rt[x * k2 + k + q] = ts[r];
  });
}

// W + dW (or dW when weight is undefined) as one GEMM, dW = L R^T, in T; the result in W's dtype.
template <typename T>
at::Tensor separable_gemm(const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n,
                          double s, const at::Tensor& weight) {
  at::Tensor left, right;
  separable_factors<T>(coeffs, rows, cols, k, m, n, s, &left, &right);
  if (!weight.defined()) return at::mm(left, right.t());
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  if (weight.scalar_type() == acc) return at::addmm(weight, left, right.t());
  return at::addmm(weight.to(acc), left, right.t()).to(weight.scalar_type());
}

// dL/dcoeffs through G R (one GEMM, [m, 2k]), then the row phases: sum_m (cos phi - i sin phi)(Tc - i Ts).
template <typename T>
void separable_gemm_grad(const at::Tensor& grad_dw, const int64_t* rows, const int64_t* cols, int64_t k, double s,
                         T* out) {
  const int64_t m = grad_dw.size(0), n = grad_dw.size(1), k2 = 2 * k;
  at::Tensor right;
  separable_factors<T>(nullptr, rows, cols, k, m, n, s, nullptr, &right);
  const at::Tensor t = at::mm(grad_dw, right);
  const T* tp = t.const_data_ptr<T>();
  std::vector<T> tc, ts;
  phase_table(m, tc, ts);
  const int64_t chunks = num_chunks_for(m, 4 * k);
  std::vector<double> partial(chunks * k2, 0.0);
  for_chunks(m, chunks, [&](int64_t c, int64_t m0, int64_t m1) {
    double* p = partial.data() + c * k2;
    std::vector<int64_t> r(k);
    for (int64_t q = 0; q < k; ++q) r[q] = (m0 * rows[q]) % m;
    for (int64_t row = m0; row < m1; ++row) {
      const T* trow = tp + row * k2;
      for (int64_t q = 0; q < k; ++q) {
        const double cp = tc[r[q]], sp = ts[r[q]], tcs = trow[q], tss = trow[k + q];
        p[q] += cp * tcs - sp * tss;
        p[k + q] -= sp * tcs + cp * tss;
        r[q] += rows[q];
        if (r[q] >= m) r[q] -= m;
      }
    }
  });
  for (int64_t q = 0; q < k; ++q) {
    double re = 0, im = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      re += partial[c * k2 + q];
      im += partial[c * k2 + k + q];
    }
    out[2 * q] = static_cast<T>(s * re);
    out[2 * q + 1] = static_cast<T>(s * im);
  }
}

template <typename T>
void separable_grad(const T* g, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n, double s,
                    T* out) {
  const std::vector<T> b = column_tables<T>(cols, k, n);
  std::vector<T> tc, ts;
  phase_table(m, tc, ts);
  const int64_t blocks = (m + 3) / 4;
  const int64_t chunks = num_chunks_for(blocks, 8 * k * n);
  std::vector<double> partial(chunks * 2 * k, 0.0);
  for_chunks(blocks, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
    double* p = partial.data() + c * 2 * k;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * 4, nr = std::min<int64_t>(4, m - r0);
      const T* g0 = g + r0 * n;
      const T* g1 = nr > 1 ? g0 + n : g0;
      const T* g2 = nr > 2 ? g0 + 2 * n : g0;
      const T* g3 = nr > 3 ? g0 + 3 * n : g0;
      for (int64_t q = 0; q < k; ++q) {
        const T* bc = b.data() + q * n;
        const T* bs = b.data() + (k + q) * n;
        T c0 = 0, c1 = 0, c2 = 0, c3 = 0, s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : c0, c1, c2, c3, s0, s1, s2, s3)
        for (int64_t x = 0; x < n; ++x) {
          const T vc = bc[x], vs = bs[x];
          c0 += g0[x] * vc;
          c1 += g1[x] * vc;
          c2 += g2[x] * vc;
          c3 += g3[x] * vc;
          s0 += g0[x] * vs;
          s1 += g1[x] * vs;
          s2 += g2[x] * vs;
          s3 += g3[x] * vs;
        }
        const T tcs[4] = {c0, c1, c2, c3}, tss[4] = {s0, s1, s2, s3};
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t t = ((r0 + i) * rows[q]) % m;
          const double cp = tc[t], sp = ts[t];
          // (cos phi - i sin phi) (Tc - i Ts)
          p[q] += cp * tcs[i] - sp * tss[i];
          p[k + q] -= sp * tcs[i] + cp * tss[i];
        }
      }
    }
  });
  for (int64_t i = 0; i < k; ++i) {
    double re = 0, im = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      re += partial[c * 2 * k + i];
      im += partial[c * 2 * k + k + i];
    }
    out[2 * i] = static_cast<T>(s * re);
    out[2 * i + 1] = static_cast<T>(s * im);
  }
}

}  // namespace cpu
}  // namespace lfma_ext
