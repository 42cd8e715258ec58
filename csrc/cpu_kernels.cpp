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
// Why the hybrid is the default at the paper's shapes (ratios 1e-4..2e-3: 768x768 with K = 176 or
// 943, 1024x1024 with K = 104 or 524): the separable product costs 2K*M*N multiply-adds (210 M at
// 768x768, K = 176) against the hybrid's T*M (under 0.14 M) plus the row FFTs, which take a third
// to a half of the 2-D FFT's time (the 2-D transform adds complex FFTs down all N/2+1 columns).
// Measured with benchmarks/bench_cpp.py --crossover on the project's 2-core CPU (AMD EPYC with
// AVX-512, torch 2.13 with MKL, float32, random positions, medians of 9 interleaved rounds,
// 2026-11-26; one run, about +-20% run to run), dW in ms:
//
//     shape      K:     4      16     104     176     524     943    2000    5000   29491
//     768x768  sep   0.23    0.46    1.85    3.94    9.34    20.8    37.3       -       -
//              hyb   0.59    0.60    0.60    1.01    0.91    1.73    3.07    2.02    9.15
//              fft2  1.35    1.36    1.24    1.81    1.26    2.13    1.21    1.25    1.55
//     4096^2   sep   21.4    25.2    57.3       -       -       -       -       -       -
//              hyb   45.9    48.2    47.6    52.3    50.9    52.5    50.5    55.9    85.5
//              fft2   124     131     126     139     131     126     125     126     135
//
// (the torch backend, for comparison: 0.62 .. 3.0 ms at 768x768 and 22 .. 163 ms at 4096^2). So the
// separable GEMM wins up to K ~ 20-30 at 768..1024 and ~80 at 4096^2; the hybrid from there to
// about N terms at 768..1024 (the 2-D FFT's cost does not grow with K, the hybrid's T*M does),
// and to beyond K = 29491 at 4096^2, where the 2-D transform falls out of cache; the gradient
// behaves alike. choose_algo's constants are fitted to these runs; its pick was within 1.25x of the
// fastest measured algorithm at every shape from 768x768 up, and within 40 us of it below.
//
// Threads: ATen's at::parallel_for, i.e. OpenMP in torch's own runtime (torch's libgomp is
// already loaded when the extension is, so there is one thread pool and torch.set_num_threads
// applies). Inner loops are written for `#pragma omp simd`; the hybrid's block loops need no
// gathers, so they vectorise with the baseline x86-64 ISA the extension is compiled for (no
// per-ISA builds; the FFTs and GEMMs are MKL's, dispatched at run time).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fft_irfft.h>
#include <ATen/ops/fft_irfft2.h>
#include <ATen/ops/fft_rfft.h>
#include <ATen/ops/fft_rfft2.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/complex.h>

#include "lfma_ext.h"

namespace lfma_ext {

// ---------------------------------------------------------------------------------------------
// The cost model: estimated nanoseconds on the project's 2-core CPU (2 threads, float32; only the
// ratios matter), fitted to benchmarks/bench_cpp.py --crossover. FFT costs per M*N*log2(size)
// grow with the transform's size once it leaves the caches: x (M*N / 2^21)^e beyond 2^21 entries,
// e fitted between 768x768..1024x1024 and 4096x4096 (inverse: irfft; forward: rfft of G).
// ---------------------------------------------------------------------------------------------
namespace {
constexpr double kSepPerMac[2] = {0.012, 0.015};     // [forward, inverse]: GEMM, per multiply-add
constexpr double kTermPerRow[2] = {0.35, 0.3};       // hybrid: per distinct term and row ...
constexpr double kColumnPerRow[2] = {1.0, 1.2};      // ... and per touched column and row (transpose)
constexpr double kRowFft[2] = {0.062, 0.075};        // M row FFTs of length N: per M*N*log2(N)
constexpr double kRowFftGrowth[2] = {0.47, 0.60};
constexpr double kFft2Cost[2] = {0.065, 0.100};      // 2-D FFT: per M*N*log2(M*N)
constexpr double kFft2Growth[2] = {0.31, 0.57};
constexpr double kCacheEntries = 2097152.0;          // 2^21
// Fixed costs per call (tables, allocations, FFT plans), which decide on small layers (64x64).
constexpr double kSepLoopCall = 12000, kSepGemmCall = 25000, kHybridCall = 18000, kFft2Call = 20000;
// Up to this K the separable product runs as fused loops (one pass over the output, no tables in
// memory, no GEMM setup); beyond it as an MKL GEMM, which was faster from K = 4 (dW) and K = 8
// (gradient; G R is a tall-skinny GEMM) in the crossover runs.
constexpr int64_t kSepLoopMaxK[2] = {4, 2};          // [forward (gradient), inverse (dW)]

double log2d(double x) { return std::log2(std::max(x, 2.0)); }
double growth(double entries, double e) { return std::pow(std::max(1.0, entries / kCacheEntries), e); }
}  // namespace

int64_t choose_algo(int64_t k, int64_t terms, int64_t columns, int64_t d_out, int64_t d_in, bool inverse) {
  const int i = inverse ? 1 : 0;
  const double m = static_cast<double>(d_out), n = static_cast<double>(d_in), mn = m * n;
  const double half = std::floor(n / 2) + 1;
  const double t = static_cast<double>(terms < 0 ? k : std::min(terms, k));
  // Distinct columns: as given, or what t random frequencies touch on average.
  const double c = columns < 0 ? half * (1.0 - std::exp(-t / half)) : static_cast<double>(columns);
  const double sep = (k <= kSepLoopMaxK[i] ? kSepLoopCall : kSepGemmCall) +
                     kSepPerMac[i] * 2.0 * static_cast<double>(k) * mn;
  const double hybrid = kHybridCall + (kTermPerRow[i] * t + kColumnPerRow[i] * c) * m +
                        kRowFft[i] * growth(mn, kRowFftGrowth[i]) * mn * log2d(n);
  const double fft2 = kFft2Call + kFft2Cost[i] * growth(mn, kFft2Growth[i]) * mn * log2d(mn);
  if (sep <= hybrid && sep <= fft2) return kSeparable;
  return hybrid <= fft2 ? kHybrid : kFft2;
}

namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;

// cos/sin(2 pi t / d) for t < d, evaluated in double and rounded once to T.
template <typename T>
void phase_table(int64_t d, std::vector<T>& c, std::vector<T>& s) {
  c.resize(d);
  s.resize(d);
  at::parallel_for(0, d, 2048, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const double a = kTwoPi * static_cast<double>(t) / static_cast<double>(d);
      c[t] = static_cast<T>(std::cos(a));
      s[t] = static_cast<T>(std::sin(a));
    }
  });
}

template <typename T>
at::ScalarType complex_type() {
  return std::is_same<T, double>::value ? at::kComplexDouble : at::kComplexFloat;
}

// How many chunks to split n items of `work_per_item` each into: one per thread, fewer when the
// work is small. Chunks (not threads) own partial sums, so results do not depend on scheduling.
int64_t num_chunks_for(int64_t n, int64_t work_per_item) {
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(work_per_item, 1) / 32768);
  return std::min({max_chunks, by_work, std::max<int64_t>(n, 1)});
}

// f(chunk, begin, end) over `chunks` nearly equal ranges of [0, n), in parallel.
template <typename F>
void for_chunks(int64_t n, int64_t chunks, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, n * c / chunks, n * (c + 1) / chunks);
  });
}

// The hybrid's direct terms. Frequency k becomes the term c e^{2 pi i m step / M} in column col <= N/2
// of the row-FFT half spectrum; a frequency past N/2 enters as the conjugate of its mirror
// (-u, N - v), so every k touches exactly one column. Frequencies with the same (col, step) share
// one term: top-K selection on a real matrix picks both members of each conjugate pair, and the
// two land on the same term, so this halves the direct work of the paper's selections.
struct Terms {
  std::vector<int32_t> step, col;   // per unique term, sorted by (col, step)
  std::vector<int32_t> term;        // per frequency: its term
  std::vector<uint8_t> mirror;      // per frequency: entered as the conjugate of its mirror
};

Terms make_terms(const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n) {
  Terms t;
  t.term.resize(k);
  t.mirror.resize(k);
  std::vector<std::pair<int64_t, int64_t>> keyed(k);  // (column * m + step, frequency)
  for (int64_t i = 0; i < k; ++i) {
    const int64_t u = rows[i], v = cols[i];
    const bool mirror = 2 * v > n;
    t.mirror[i] = mirror;
    keyed[i] = {(mirror ? n - v : v) * m + (mirror ? (m - u) % m : u), i};
  }
  std::sort(keyed.begin(), keyed.end());
  for (int64_t j = 0; j < k; ++j) {
    if (j == 0 || keyed[j].first != keyed[j - 1].first) {
      t.col.push_back(static_cast<int32_t>(keyed[j].first / m));
      t.step.push_back(static_cast<int32_t>(keyed[j].first % m));
    }
    t.term[keyed[j].second] = static_cast<int32_t>(t.col.size() - 1);
  }
  return t;
}

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

// ------------------------------------------------------------------------------ separable, dW (+ W)
// Exact-phase column tables: B[q * n + x] = cos (q < k) / sin (q >= k) of 2 pi (x v_q mod n) / n.
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
    at::parallel_for(0, m, std::max<int64_t>(1, 4096 / k2), [&](int64_t m0, int64_t m1) {
      std::vector<int64_t> r(k);
      for (int64_t q = 0; q < k; ++q) r[q] = (m0 * rows[q]) % m;
      for (int64_t row = m0; row < m1; ++row) {
        for (int64_t q = 0; q < k; ++q) {
          const double c = tc[r[q]], sn = ts[r[q]];
          const double a = coeffs[2 * q], b = coeffs[2 * q + 1];
          l[row * k2 + q] = static_cast<T>(s * (a * c - b * sn));
          l[row * k2 + k + q] = static_cast<T>(-s * (a * sn + b * c));
          r[q] += rows[q];
          if (r[q] >= m) r[q] -= m;
        }
      }
    });
  }
  phase_table(n, tc, ts);
  *right = at::empty({n, k2}, options);
  T* rt = right->data_ptr<T>();
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / k2), [&](int64_t x0, int64_t x1) {
    std::vector<int64_t> r(k);
    for (int64_t q = 0; q < k; ++q) r[q] = (x0 * cols[q]) % n;
    for (int64_t x = x0; x < x1; ++x) {
      for (int64_t q = 0; q < k; ++q) {
        rt[x * k2 + q] = tc[r[q]];
        rt[x * k2 + k + q] = ts[r[q]];
        r[q] += cols[q];
        if (r[q] >= n) r[q] -= n;
      }
    }
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

// How a call runs: the algorithm, and for the hybrid its terms (built once, also for the choice).
struct Plan {
  int64_t algo;
  Terms terms;
};

// As asked, or the cost model's pick for these K frequencies, counting the hybrid's distinct terms
// (merged conjugate pairs count once).
Plan make_plan(int64_t algo, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n,
               bool inverse) {
  Plan plan{algo, {}};
  // Past ~16 (M + N) frequencies the 2-D FFT wins even with every term merged: no terms needed.
  if (algo == kHybrid || (algo == kAuto && k <= 16 * (m + n))) plan.terms = make_terms(rows, cols, k, m, n);
  if (algo == kAuto) {
    const std::vector<int32_t>& col = plan.terms.col;  // sorted
    const bool counted = !plan.terms.term.empty();
    const int64_t terms = counted ? static_cast<int64_t>(col.size()) : k;
    int64_t columns = counted ? 0 : -1;
    for (size_t j = 0; counted && j < col.size(); ++j) columns += (j == 0 || col[j] != col[j - 1]) ? 1 : 0;
    plan.algo = choose_algo(k, terms, columns, m, n, inverse);
  }
  return plan;
}

template <typename T>
at::Tensor fft_delta(const T* coeffs, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n,
                     double s, const Plan& plan) {
  return plan.algo == kHybrid ? hybrid_delta<T>(coeffs, plan.terms, k, m, n, s)
                              : fft2_delta<T>(coeffs, rows, cols, k, m, n, s);
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
    if (plan.algo == kSeparable && k > kSepLoopMaxK[1]) {
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
      if (plan.algo == kSeparable && k > kSepLoopMaxK[1]) {
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
    if (plan.algo == kSeparable && k > kSepLoopMaxK[0]) {
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

}  // namespace lfma_ext
