// The batch path of a layer's backward (lfma_ext::coeff_grad_batch): dL/dcoeffs from x and dL/dout
// through one real FFT of each token row, never forming G = g^T x.
#pragma once

#include <ATen/ops/fft_rfft.h>

#include "cpu_common.h"
#include "cpu_plan.h"

namespace lfma_ext {
namespace cpu {

// The batch path: dL/dcoeffs from the layer's input x [T, N] and output gradient g [T, M], never
// forming G = g^T x (T*M*N multiply-adds). With e(m, u) = e^{2 pi i m u / M},
//   sum_{m,n} G[m, n] e(m, u) e(n, v) = sum_t P[t, u] Q[t, v],  P[t, u] = sum_m g[t, m] e(m, u),
// and Q likewise from x. P is read off one real FFT of each row of g: P[t, u] = conj(rfft(g)[t, u]) for
// u <= M/2, rfft(g)[t, M - u] above. So the cost is T row FFTs of each of g and x (~T (M log M + N log N))
// plus T*K complex products whose operands are gathered from one spectrum row each, which is small
// ((M/2 + 1) complex values) and stays in L1 while every frequency's product for that token is added.
// Two frequencies whose P and Q use the same bins with the same relative conjugation have equal or
// conjugate sums; a conjugate pair (u, v), (-u, -v), which top-K selection on a real matrix always picks
// together, is one such case, so terms are merged as in the hybrid's Terms and the reduction halves.
template <typename T>
void batch_fft_grad(const at::Tensor& x, const at::Tensor& g, const int64_t* rows, const int64_t* cols, int64_t k,
                    double s, T* out) {
  const int64_t tokens = x.size(0), n = x.size(1), m = g.size(1), hm = m / 2 + 1, hn = n / 2 + 1;
  // Per frequency: P = conj^a(rfft(g)[pu]), Q = conj^b(rfft(x)[qv]); the merged term is
  // Z = sum_t rfft(g)[pu] conj^(a xor b)(rfft(x)[qv]), and P Q summed is conj^a(Z).
  struct Key {
    int32_t pu, qv;
    uint8_t flip;
    bool operator<(const Key& o) const { return pu != o.pu ? pu < o.pu : qv != o.qv ? qv < o.qv : flip < o.flip; }
    bool operator==(const Key& o) const { return pu == o.pu && qv == o.qv && flip == o.flip; }
  };
  std::vector<Key> key(k);
  std::vector<uint8_t> conj_p(k);
  for (int64_t i = 0; i < k; ++i) {
    const bool cp = 2 * rows[i] <= m, cq = 2 * cols[i] <= n;
    key[i] = {static_cast<int32_t>(cp ? rows[i] : m - rows[i]), static_cast<int32_t>(cq ? cols[i] : n - cols[i]),
              static_cast<uint8_t>(cp != cq)};
    conj_p[i] = cp;
  }
  std::vector<Key> terms(key);
  std::sort(terms.begin(), terms.end());  // sorted bins: neighbouring terms read neighbouring values
  terms.erase(std::unique(terms.begin(), terms.end()), terms.end());
  const int64_t nt = static_cast<int64_t>(terms.size());
  std::vector<int32_t> pu(nt), qv(nt);
  std::vector<T> qsign(nt);
  for (int64_t t = 0; t < nt; ++t) {
    pu[t] = 2 * terms[t].pu;
    qv[t] = 2 * terms[t].qv;
    qsign[t] = terms[t].flip ? T(-1) : T(1);
  }
  const at::Tensor gs = at::fft_rfft(g, m, 1), xs = at::fft_rfft(x, n, 1);
  const T* gz = reinterpret_cast<const T*>(gs.const_data_ptr());
  const T* xz = reinterpret_cast<const T*>(xs.const_data_ptr());
  const int64_t chunks = num_chunks_for(tokens, 8 * nt);
  std::vector<double> partial(chunks * 2 * nt, 0.0);
  // Blocks of kTokens tokens are summed in T, then added to the chunk's double sums: a float32 sum
  // over thousands of tokens would lose digits the dense path (one GEMM, blocked sums) keeps.
  constexpr int64_t kTokens = 32;
  for_chunks(tokens, chunks, [&](int64_t c, int64_t t0, int64_t t1) {
    double* acc = partial.data() + c * 2 * nt;
    std::vector<T> re(nt), im(nt);
    for (int64_t b0 = t0; b0 < t1; b0 += kTokens) {
      std::fill(re.begin(), re.end(), T(0));
      std::fill(im.begin(), im.end(), T(0));
      for (int64_t t = b0; t < std::min(t1, b0 + kTokens); ++t) {
        const T* __restrict__ gr = gz + 2 * t * hm;
        const T* __restrict__ xr = xz + 2 * t * hn;
        for (int64_t j = 0; j < nt; ++j) {
          const T pr = gr[pu[j]], pi = gr[pu[j] + 1], qr = xr[qv[j]], qi = qsign[j] * xr[qv[j] + 1];
          re[j] += pr * qr - pi * qi;
          im[j] += pr * qi + pi * qr;
        }
      }
      for (int64_t j = 0; j < nt; ++j) {
        acc[j] += re[j];
        acc[nt + j] += im[j];
      }
    }
  });
  // grad = s (Re, -Im) of sum P Q = s (Re Z, -Im Z) where P Q sums to conj(Z), s (Re Z, Im Z) where to Z.
  for (int64_t i = 0; i < k; ++i) {
    const int64_t t = std::lower_bound(terms.begin(), terms.end(), key[i]) - terms.begin();
    double r = 0, q = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      r += partial[c * 2 * nt + t];
      q += partial[c * 2 * nt + nt + t];
    }
    out[2 * i] = static_cast<T>(s * r);
    out[2 * i + 1] = static_cast<T>(conj_p[i] ? s * q : -s * q);
  }
}

}  // namespace cpu
}  // namespace lfma_ext
