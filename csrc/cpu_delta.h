// The delta path's rows way (lfma_ext::delta_rows): x dW^T for token rows x [T, N], without W, beside a
// quantized base layer (lfma_kernels/ops/delta_kernels.py has the math and the torch version).
#pragma once

#include <ATen/ops/fft_irfft.h>
#include <ATen/ops/fft_rfft.h>
#include <ATen/ops/zeros.h>

#include "cpu_batch.h"
#include "cpu_common.h"

namespace lfma_ext {
namespace cpu {

// One adapter's frequencies as the (target, source, conjugation) entries that the token loop applies.
template <typename T>
struct DeltaEntries {
  std::vector<int32_t> p2, j2;  // 2 * target bin of H, 2 * source bin of the row's spectrum (interleaved re, im)
  std::vector<T> gr, gi, sign;  // gamma = gr + i gi; sign -1: gamma * conj(X[j])

  // Entries with the same (target, source, conjugation) are merged, and sorted by source so that
  // neighbouring entries read neighbouring values, when `merge` (worth its sort over many tokens; a
  // conjugate pair of a full-spectrum selection gives the same entry twice).
  DeltaEntries(const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n, double s,
               bool merge) {
    struct Entry {
      int32_t p, j, conj;
      double gr, gi;
      bool operator<(const Entry& o) const { return j != o.j ? j < o.j : p != o.p ? p < o.p : conj < o.conj; }
      bool same(const Entry& o) const { return j == o.j && p == o.p && conj == o.conj; }
    };
    std::vector<Entry> entries;
    entries.reserve(2 * k);
    const double scale = 0.5 * s * static_cast<double>(m);  // Hermitian half (1/2), irfft's 1/M undone (M)
    for (int64_t i = 0; i < k; ++i) {
      const double cr = scale * static_cast<double>(coeffs[2 * i]), ci = scale * static_cast<double>(coeffs[2 * i + 1]);
      const int64_t mirror_v = (n - cols[i]) % n;
      const bool stored = 2 * mirror_v <= n;  // e^{+...} at v is the stored bin -v, or conj(bin v)
      const int32_t j = static_cast<int32_t>(stored ? mirror_v : cols[i]);
      const int32_t cq = stored ? 0 : 1;
      const int64_t u = rows[i], mu = (m - u) % m;
      if (2 * u <= m) entries.push_back({static_cast<int32_t>(u), j, cq, cr, ci});          // c Q at u
      if (2 * mu <= m) entries.push_back({static_cast<int32_t>(mu), j, 1 - cq, cr, -ci});  // conj(c Q) at -u
    }
    std::vector<Entry> merged;
    if (merge) {
      std::sort(entries.begin(), entries.end());
      for (const Entry& e : entries) {
        if (!merged.empty() && merged.back().same(e)) {
          merged.back().gr += e.gr;
          merged.back().gi += e.gi;
        } else {
          merged.push_back(e);
        }
      }
    } else {
      merged.swap(entries);
    }
    for (const Entry& e : merged) {
      p2.push_back(2 * e.p);
      j2.push_back(2 * e.j);
      gr.push_back(static_cast<T>(e.gr));
      gi.push_back(static_cast<T>(e.gi));
      sign.push_back(e.conj ? T(-1) : T(1));
    }
  }

  // hr (one token's H, interleaved) += the entries applied to xr (its row spectrum, interleaved).
  void apply(const T* xr, T* hr) const {
    const int64_t ne = static_cast<int64_t>(p2.size());
    for (int64_t e = 0; e < ne; ++e) {
      const T a = xr[j2[e]], b = sign[e] * xr[j2[e] + 1];
      hr[p2[e]] += gr[e] * a - gi[e] * b;
      hr[p2[e] + 1] += gi[e] * a + gr[e] * b;
    }
  }
};

// An adapter with a single token applies its entries as they come: sorting and merging 2K entries costs
// more than it saves once (at K = 943 on 768x768: 30 against 40 us), and from two tokens on it pays.
constexpr int64_t kMergeTokens = 2;

// With Q[t, k] = sum_n x[t, n] e^{2 pi i n v_k / N} (a stored bin of the row's real FFT, or its conjugate)
// and c_k the coefficients, (x dW^T)[t, m] = s Re sum_k c_k e^{2 pi i m u_k / M} Q[t, k], which is M times
// the inverse real FFT of the Hermitian half spectrum H[u] = (R[u] + conj(R[-u])) / 2, R[u] = sum over
// u_k = u of c_k Q[t, k]. So each frequency adds gamma * X[j] or gamma * conj(X[j]) at up to two bins of H
// (u and -u, where they lie in the stored half): per token, one real FFT, 2K complex products gathered
// from one spectrum row and scattered into another, one inverse real FFT: T (N log N + M log M + K)
// instead of T M N. Entries with the same (target, source, conjugation) are merged first from
// kMergeTokens tokens on. Memory as the batch path: token blocks whose two spectra stay in the thread's L2.
template <typename T>
void delta_rows(const at::Tensor& x, const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k,
                int64_t m, double s, at::Tensor& out) {
  const int64_t tokens = x.size(0), n = x.size(1), hm = m / 2 + 1, hn = n / 2 + 1;
  const DeltaEntries<T> entries(coeffs, rows, cols, k, m, n, s, tokens >= kMergeTokens);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tokens / kChunkTokens, at::get_num_threads()));
  for_chunks(tokens, chunks, [&](int64_t, int64_t c0, int64_t c1) {
    const int64_t blocks = (c1 - c0 + kBlockTokens - 1) / kBlockTokens;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t t0 = c0 + (c1 - c0) * blk / blocks, nb = c0 + (c1 - c0) * (blk + 1) / blocks - t0;
      // Inside the parallel region ATen runs these FFTs on this thread.
      const at::Tensor xs = at::fft_rfft(x.narrow(0, t0, nb), n, 1);
      at::Tensor h = at::zeros({nb, hm}, xs.options());
      const T* xz = reinterpret_cast<const T*>(xs.const_data_ptr());
      T* hz = reinterpret_cast<T*>(h.data_ptr());
      for (int64_t t = 0; t < nb; ++t) entries.apply(xz + 2 * t * hn, hz + 2 * t * hm);
      out.narrow(0, t0, nb).copy_(at::fft_irfft(h, m, 1));
    }
  });
}

// Several adapters' x dW^T in one call (a mixed-adapter batch while decoding: a few tokens each): x's
// rows come grouped by adapter (t_counts[g] rows of adapter g, whose k_counts[g] frequencies follow each
// other in coeffs/rows/cols, with scale s[g]); one real FFT of every row, each adapter's entries on its
// rows, one inverse FFT. For a few hundred rows at most (the spectra of all of them are held at once).
template <typename T>
void delta_rows_grouped(const at::Tensor& x, const T* coeffs, const int64_t* rows, const int64_t* cols,
                        const std::vector<int64_t>& k_counts, const std::vector<int64_t>& t_counts,
                        const std::vector<double>& s, int64_t m, at::Tensor& out) {
  const int64_t n = x.size(1), hm = m / 2 + 1, hn = n / 2 + 1;
  const at::Tensor xs = at::fft_rfft(x, n, 1);
  at::Tensor h = at::zeros({x.size(0), hm}, xs.options());
  const T* xz = reinterpret_cast<const T*>(xs.const_data_ptr());
  T* hz = reinterpret_cast<T*>(h.data_ptr());
  int64_t k0 = 0, t0 = 0;
  for (size_t g = 0; g < k_counts.size(); ++g) {
    const DeltaEntries<T> entries(coeffs + 2 * k0, rows + k0, cols + k0, k_counts[g], m, n, s[g],
                                  t_counts[g] >= kMergeTokens);
    for (int64_t t = t0; t < t0 + t_counts[g]; ++t) entries.apply(xz + 2 * t * hn, hz + 2 * t * hm);
    k0 += k_counts[g];
    t0 += t_counts[g];
  }
  out.copy_(at::fft_irfft(h, m, 1));
}

}  // namespace cpu
}  // namespace lfma_ext
