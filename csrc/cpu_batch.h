// The batch path of a layer's backward (lfma_ext::coeff_grad_batch): dL/dcoeffs from x and dL/dout
// through one real FFT of each token row, never forming G = g^T x.
#pragma once

#include <ATen/ops/fft_rfft.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu_common.h"
#include "cpu_plan.h"

namespace lfma_ext {
namespace cpu {

// The batch path: dL/dcoeffs from the layer's input x [T, N] and output gradient g [T, M], never
// forming G = g^T x (T*M*N multiply-adds). With e(m, u) = e^{2 pi i m u / M},
//   sum_{m,n} G[m, n] e(m, u) e(n, v) = sum_t P[t, u] Q[t, v],  P[t, u] = sum_m g[t, m] e(m, u),
// and Q likewise from x. P is read off one real FFT of each row of g: P[t, u] = conj(rfft(g)[t, u]) for
// u <= M/2, rfft(g)[t, M - u] above. So the cost is T row FFTs of each of g and x (~T (M log M + N log N))
// plus T*K complex products whose operands are gathered from one spectrum row of each.
// Two frequencies whose P and Q use the same bins with the same relative conjugation have equal or
// conjugate sums; a conjugate pair (u, v), (-u, -v), which top-K selection on a real matrix always picks
// together, is one such case, so terms are merged as in the hybrid's Terms and the reduction halves.
//
// Memory: the spectra of a whole batch (T (M/2 + N/2 + 2) complex values: 6 MB at 1024 tokens of a
// 768x768 layer) would leave the caches between the FFTs and the products. Instead each thread takes
// blocks of kBlockTokens tokens and consumes their two spectra (1.6 MB at 768x768) while they are in its
// L2; larger blocks would not fit, smaller ones pay ATen's per-call FFT set-up (~10 us) more often.
constexpr int64_t kBlockTokens = 256;
// A thread's share is at least this many tokens: below it, a share's two FFT calls cost more in set-up
// (~10 us each) than the work they split.
constexpr int64_t kChunkTokens = 64;
// Runs of kRunTokens tokens are summed in T, then added to double sums: a float32 sum over thousands of
// tokens would lose digits the dense path (one GEMM, blocked sums) keeps.
constexpr int64_t kRunTokens = 32;

// The running sums of term j over the tokens of one run: sum_t a b and sum_t a swap(b) as (re, im)
// lanes, where a = rfft(g)[t, pu], b = rfft(x)[t, qv]. The conjugation of b is applied to the totals.
template <typename T>
struct RunSums {
  std::vector<T> ab, aswb;  // [term][4]: lanes (re re, im im) and (re im, im re), for two token slots
  explicit RunSums(int64_t nt) : ab(4 * nt), aswb(4 * nt) {}
  void clear() {
    std::fill(ab.begin(), ab.end(), T(0));
    std::fill(aswb.begin(), aswb.end(), T(0));
  }
};

// Adds tokens [t0, t1) of a block's spectra (rows of hm and hn complex values) to the run sums. The
// operands are gathers (each term reads one bin of each row), so the loop is bound by loads. With SSE2
// a complex value is one 64-bit load, two tokens' products are one vector multiply, and eight tokens
// per pass over the terms load and store each term's sums once: about half the time of scalar complex
// products (K = 943 at 768x768, 1024 tokens, the op timed in a loop on the 2-core Xeon: 0.3 ms above
// its K = 2 time, against 0.55 ms with the scalar loop).
template <typename T>
void add_products(const T* gz, const T* xz, int64_t hm, int64_t hn, int64_t t0, int64_t t1, const int32_t* pu,
                  const int32_t* qv, int64_t nt, RunSums<T>& sums) {
  int64_t t = t0;
#if defined(__SSE2__)
  if constexpr (std::is_same<T, float>::value) {
    for (; t + 8 <= t1; t += 8) {
      const float* g0 = gz + 2 * t * hm;
      const float* x0 = xz + 2 * t * hn;
      const int64_t sg = 2 * hm, sx = 2 * hn;
      auto pair = [](const float* lo, const float* hi) {  // (re, im) of two tokens in one vector
        return _mm_loadh_pi(_mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(lo)),
                            reinterpret_cast<const __m64*>(hi));
      };
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t a = pu[j], b = qv[j];
        __m128 ab = _mm_setzero_ps(), asw = _mm_setzero_ps();
        for (int q = 0; q < 8; q += 2) {
          const __m128 av = pair(g0 + q * sg + a, g0 + (q + 1) * sg + a);
          const __m128 bv = pair(x0 + q * sx + b, x0 + (q + 1) * sx + b);
          ab = _mm_add_ps(ab, _mm_mul_ps(av, bv));
          asw = _mm_add_ps(asw, _mm_mul_ps(av, _mm_shuffle_ps(bv, bv, _MM_SHUFFLE(2, 3, 0, 1))));
        }
        float* abp = sums.ab.data() + 4 * j;
        float* aswp = sums.aswb.data() + 4 * j;
        _mm_storeu_ps(abp, _mm_add_ps(_mm_loadu_ps(abp), ab));
        _mm_storeu_ps(aswp, _mm_add_ps(_mm_loadu_ps(aswp), asw));
      }
    }
  }
#endif
  for (; t < t1; ++t) {
    const T* gr = gz + 2 * t * hm;
    const T* xr = xz + 2 * t * hn;
    for (int64_t j = 0; j < nt; ++j) {
      const T ar = gr[pu[j]], ai = gr[pu[j] + 1], br = xr[qv[j]], bi = xr[qv[j] + 1];
      T* ab = sums.ab.data() + 4 * j;
      T* asw = sums.aswb.data() + 4 * j;
      ab[0] += ar * br;
      ab[1] += ai * bi;
      asw[0] += ar * bi;
      asw[1] += ai * br;
    }
  }
}

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
  std::vector<double> qsign(nt);
  for (int64_t t = 0; t < nt; ++t) {
    pu[t] = 2 * terms[t].pu;
    qv[t] = 2 * terms[t].qv;
    qsign[t] = terms[t].flip ? -1.0 : 1.0;
  }
  // One chunk of tokens per thread, at least kChunkTokens each: equal shares, each taken in blocks of at
  // most kBlockTokens (dealt out by whole blocks, ViT-B's 788 tokens at batch 4 would split 512 + 276,
  // and 256 tokens would run on one thread). Chunks own partial sums, so the result does not depend on
  // scheduling.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tokens / kChunkTokens, at::get_num_threads()));
  std::vector<double> partial(chunks * 2 * nt, 0.0);
  for_chunks(tokens, chunks, [&](int64_t c, int64_t c0, int64_t c1) {
    double* acc = partial.data() + c * 2 * nt;
    RunSums<T> sums(nt);
    const int64_t blocks = (c1 - c0 + kBlockTokens - 1) / kBlockTokens;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      // Blocks of equal size within the chunk.
      const int64_t t0 = c0 + (c1 - c0) * blk / blocks, nb = c0 + (c1 - c0) * (blk + 1) / blocks - t0;
      // Inside the parallel region ATen runs these FFTs on this thread.
      const at::Tensor gs = at::fft_rfft(g.narrow(0, t0, nb), m, 1), xs = at::fft_rfft(x.narrow(0, t0, nb), n, 1);
      const T* gz = reinterpret_cast<const T*>(gs.const_data_ptr());
      const T* xz = reinterpret_cast<const T*>(xs.const_data_ptr());
      for (int64_t r0 = 0; r0 < nb; r0 += kRunTokens) {
        sums.clear();
        add_products<T>(gz, xz, hm, hn, r0, std::min(nb, r0 + kRunTokens), pu.data(), qv.data(), nt, sums);
        // Z = sum a conj^flip(b): re = (re re) - sign (im im), im = sign (re im) + (im re).
        for (int64_t j = 0; j < nt; ++j) {
          const T* ab = sums.ab.data() + 4 * j;
          const T* asw = sums.aswb.data() + 4 * j;
          const double rr = static_cast<double>(ab[0]) + ab[2], ii = static_cast<double>(ab[1]) + ab[3];
          const double ri = static_cast<double>(asw[0]) + asw[2], ir = static_cast<double>(asw[1]) + asw[3];
          acc[j] += rr - qsign[j] * ii;
          acc[nt + j] += qsign[j] * ri + ir;
        }
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
