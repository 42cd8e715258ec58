// The hybrid algorithm (kHybrid): rows direct from the K frequencies' terms, columns by one batch
// of row real FFTs; for dW and, mirrored, for dL/dcoeffs from G.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/fft_irfft.h>
#include <ATen/ops/fft_rfft.h>

#include "cpu_common.h"
#include "cpu_plan.h"

namespace lfma_ext {
namespace cpu {

// ------------------------------------------------------------------------------ hybrid, dW
// The direct part works on blocks of kRows rows. Term t's values on rows m0 + j are
// c_t e^{2 pi i (m0 + j) s_t / M} = e^{2 pi i m0 s_t / M} * w_t[j], w_t[j] = c_t e^{2 pi i j s_t / M}:
// one exact table value (the residue m0 s_t mod M is kept exactly) times a per-term vector computed
// once in double, so each value carries a few ulp of rounding and no accumulated phase error, and
// the loop over j vectorises without gathers. A block accumulates into a column-major scratch
// S[col][j] (each term updates one contiguous kRows-vector: no scattered read-modify-writes), then
// the touched columns are transposed into the rows of the half spectrum.
constexpr int64_t kRows = 8;

// Per-term block data: w_t[j] (or its conjugate for the gradient) and the residue step per block.
template <typename T>
struct BlockTerms {
  std::vector<T> wr, wi;        // [terms][kRows]
  std::vector<int32_t> step8;   // (kRows * step) mod M
  std::vector<int32_t> ucols;   // the distinct columns, ascending
};

// tcd/tsd: the length-m phase table in double.
template <typename T>
BlockTerms<T> block_terms(const Terms& f, const double* cre, const double* cim, int64_t m, const double* tcd,
                          const double* tsd, bool conj) {
  const int64_t nt = static_cast<int64_t>(f.col.size());
  BlockTerms<T> b;
  b.wr.resize(nt * kRows);
  b.wi.resize(nt * kRows);
  b.step8.resize(nt);
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t j = 0; j < kRows; ++j) {
      const int64_t r = (j * f.step[t]) % m;
      const double c = tcd[r], sn = conj ? -tsd[r] : tsd[r];
      b.wr[t * kRows + j] = static_cast<T>(cre[t] * c - cim[t] * sn);
      b.wi[t * kRows + j] = static_cast<T>(cre[t] * sn + cim[t] * c);
    }
    b.step8[t] = static_cast<int32_t>((kRows * f.step[t]) % m);
    if (t == 0 || f.col[t] != f.col[t - 1]) b.ucols.push_back(f.col[t]);
  }
  return b;
}

template <typename T>
at::Tensor hybrid_delta(const T* coeffs, const Terms& f, int64_t k, int64_t m, int64_t n, double s) {
  const int64_t half = n / 2 + 1;
  const int64_t nt = static_cast<int64_t>(f.col.size());
  // Z[row, j] is the Hermitian part (H[j] + conj(H[-j])) / 2 of H[row, v] = sum_{v_k = v} c_k e^{..}:
  // a plain column takes c/2 (or conj(c)/2 from a mirror); the self-mirrored columns 0 and N/2
  // take the real part, written as c with the imaginary part zeroed after the sum.
  std::vector<double> cre(nt, 0.0), cim(nt, 0.0);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = f.term[i], j = f.col[t];
    const double w = (j == 0 || 2 * j == n) ? s : 0.5 * s;
    cre[t] += w * static_cast<double>(coeffs[2 * i]);
    cim[t] += (f.mirror[i] ? -w : w) * static_cast<double>(coeffs[2 * i + 1]);
  }
  std::vector<double> tcd, tsd;
  phase_table(m, tcd, tsd);
  const BlockTerms<T> b = block_terms<T>(f, cre.data(), cim.data(), m, tcd.data(), tsd.data(), false);
  const std::vector<T> tc(tcd.begin(), tcd.end()), ts(tsd.begin(), tsd.end());
  // Every entry of Z is written by the blocks below (untouched columns as zeros).
  at::Tensor spectrum = at::empty({m, half}, at::TensorOptions().dtype(complex_type<T>()));
  T* z = reinterpret_cast<T*>(spectrum.data_ptr());
  const int32_t mi = static_cast<int32_t>(m);
  const int64_t nu = static_cast<int64_t>(b.ucols.size());
  const int64_t blocks = (m + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, 4096 / (kRows * (nt + nu) + 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<T> sre(half * kRows, T(0)), sim(half * kRows, T(0));
    std::vector<int32_t> res(nt);
    for (int64_t t = 0; t < nt; ++t) res[t] = static_cast<int32_t>((b0 * kRows * f.step[t]) % m);
    for (int64_t blk = b0; blk < b1; ++blk) {
      for (int64_t t = 0; t < nt; ++t) {
        const int32_t r = res[t];
        const T br = tc[r], bi = ts[r];
        T* __restrict__ sr = sre.data() + f.col[t] * kRows;
        T* __restrict__ si = sim.data() + f.col[t] * kRows;
        const T* __restrict__ wr = b.wr.data() + t * kRows;
        const T* __restrict__ wi = b.wi.data() + t * kRows;
#pragma omp simd
        for (int64_t j = 0; j < kRows; ++j) {
          sr[j] += br * wr[j] - bi * wi[j];
          si[j] += br * wi[j] + bi * wr[j];
        }
        const int32_t next = r + b.step8[t];
        res[t] = next >= mi ? next - mi : next;
      }
      const int64_t m0 = blk * kRows, nr = std::min<int64_t>(kRows, m - m0);
      // Transpose the scratch into whole rows of Z (streaming writes; untouched columns are zero
      // in the scratch), then clear the touched columns for the next block.
      for (int64_t i = 0; i < nr; ++i) {
        T* zrow = z + 2 * (m0 + i) * half;
        const T* sr = sre.data() + i;
        const T* si = sim.data() + i;
        for (int64_t j = 0; j < half; ++j) {
          zrow[2 * j] = sr[j * kRows];
          zrow[2 * j + 1] = si[j * kRows];
        }
        zrow[1] = T(0);  // the self-mirrored columns 0 and N/2 keep their real part
        if (n % 2 == 0) zrow[2 * (half - 1) + 1] = T(0);
      }
      for (int64_t u = 0; u < nu; ++u) {
        const int64_t j = b.ucols[u];
        std::fill(sre.data() + j * kRows, sre.data() + (j + 1) * kRows, T(0));
        std::fill(sim.data() + j * kRows, sim.data() + (j + 1) * kRows, T(0));
      }
    }
  });
  // norm="forward": the inverse transform is unscaled; s is already in the coefficients.
  return at::fft_irfft(spectrum, n, 1, "forward");
}

// ------------------------------------------------------------------------------ gradients
// grad[k] = s * (Re, Im) fft2(G)[u_k, v_k], written as [k, 2] in T.
template <typename T>
void hybrid_grad(const at::Tensor& grad_dw, const Terms& f, int64_t k, double s, T* out) {
  const int64_t m = grad_dw.size(0), n = grad_dw.size(1), half = n / 2 + 1;
  // R[row, j] = sum_x G[row, x] e^{-2 pi i x j / n}: one batch of real FFTs along the rows.
  const at::Tensor spectrum = at::fft_rfft(grad_dw, n, 1);
  const T* z = reinterpret_cast<const T*>(spectrum.const_data_ptr());
  // fft2(G)[u, v] = sum_row R[row, v] e^{-2 pi i row u / m}; for v > n/2, R[row, v] = conj(R[row, n-v]),
  // so the sum is conj(sum_row R[row, n-v] e^{-2 pi i row (m-u) / m}): one sum per term (see Terms),
  // evaluated by blocks of kRows rows as in hybrid_delta: sum_j S[col][j] conj(e^{2 pi i j u / m}),
  // then times conj(e^{2 pi i m0 u / m}) from the table.
  const int64_t nt = static_cast<int64_t>(f.col.size());
  const std::vector<double> ones(nt, 1.0), zeros(nt, 0.0);
  std::vector<double> tcd, tsd;
  phase_table(m, tcd, tsd);
  const BlockTerms<T> b = block_terms<T>(f, ones.data(), zeros.data(), m, tcd.data(), tsd.data(), true);
  const std::vector<T> tc(tcd.begin(), tcd.end()), ts(tsd.begin(), tsd.end());
  const int64_t nu = static_cast<int64_t>(b.ucols.size());
  const int64_t blocks = (m + kRows - 1) / kRows;
  const int64_t chunks = num_chunks_for(blocks, kRows * (nt + nu));
  std::vector<double> partial(chunks * 2 * nt, 0.0);
  const int32_t mi = static_cast<int32_t>(m);
  for_chunks(blocks, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
    std::vector<T> sre(half * kRows, T(0)), sim(half * kRows, T(0));
    std::vector<int32_t> res(nt);
    std::vector<double> acc(2 * nt, 0.0);
    for (int64_t t = 0; t < nt; ++t) res[t] = static_cast<int32_t>((b0 * kRows * f.step[t]) % m);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kRows, nr = std::min<int64_t>(kRows, m - m0);
      for (int64_t u = 0; u < nu; ++u) {  // the touched columns of these rows, transposed (zero-padded)
        const int64_t j = b.ucols[u];
        for (int64_t i = 0; i < nr; ++i) {
          sre[j * kRows + i] = z[2 * ((m0 + i) * half + j)];
          sim[j * kRows + i] = z[2 * ((m0 + i) * half + j) + 1];
        }
        for (int64_t i = nr; i < kRows; ++i) sre[j * kRows + i] = sim[j * kRows + i] = T(0);
      }
      for (int64_t t = 0; t < nt; ++t) {
        const T* __restrict__ sr = sre.data() + f.col[t] * kRows;
        const T* __restrict__ si = sim.data() + f.col[t] * kRows;
        const T* __restrict__ wr = b.wr.data() + t * kRows;
        const T* __restrict__ wi = b.wi.data() + t * kRows;
        T dr = 0, di = 0;
#pragma omp simd reduction(+ : dr, di)
        for (int64_t j = 0; j < kRows; ++j) {
          dr += sr[j] * wr[j] - si[j] * wi[j];
          di += sr[j] * wi[j] + si[j] * wr[j];
        }
        const int32_t r = res[t];
        const double br = tc[r], bi = -static_cast<double>(ts[r]);  // conj(e^{2 pi i m0 u / m})
        acc[t] += br * dr - bi * di;
        acc[nt + t] += br * di + bi * dr;
        const int32_t next = r + b.step8[t];
        res[t] = next >= mi ? next - mi : next;
      }
    }
    std::copy(acc.begin(), acc.end(), partial.begin() + c * 2 * nt);
  });
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = f.term[i];
    double re = 0, im = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      re += partial[c * 2 * nt + t];
      im += partial[c * 2 * nt + nt + t];
    }
    out[2 * i] = static_cast<T>(s * re);
    out[2 * i + 1] = static_cast<T>(f.mirror[i] ? -s * im : s * im);
  }
}

}  // namespace cpu
}  // namespace lfma_ext
