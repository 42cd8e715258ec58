// The CPU kernels' cost model: which of the three algorithms (see cpu_kernels.cpp) builds dW or reads
// dL/dcoeffs from G for K frequencies on a d_out x d_in weight. It stays in C++ because it counts the
// hybrid's distinct terms and columns of the actual positions; lfma_kernels/ops/planner.py reports
// its choice (choose_algo, algo_costs, count_terms) and can force another (algo=).
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
#include "cpu_plan.h"

#include <algorithm>
#include <cmath>
#include <utility>

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

// Past ~16 (M + N) frequencies the 2-D FFT wins even with every term merged: no terms needed.
bool worth_counting(int64_t k, int64_t m, int64_t n) { return k <= 16 * (m + n); }

// The distinct terms and distinct (sorted) columns of the hybrid's terms.
std::array<int64_t, 2> term_counts(const cpu::Terms& t) {
  int64_t columns = 0;
  for (size_t j = 0; j < t.col.size(); ++j) columns += (j == 0 || t.col[j] != t.col[j - 1]) ? 1 : 0;
  return {static_cast<int64_t>(t.col.size()), columns};
}
}  // namespace

std::array<double, 3> algo_costs(int64_t k, int64_t terms, int64_t columns, int64_t d_out, int64_t d_in,
                                 bool inverse) {
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
  return {sep, hybrid, fft2};
}

int64_t choose_algo(int64_t k, int64_t terms, int64_t columns, int64_t d_out, int64_t d_in, bool inverse) {
  const std::array<double, 3> c = algo_costs(k, terms, columns, d_out, d_in, inverse);
  if (c[0] <= c[1] && c[0] <= c[2]) return kSeparable;
  return c[1] <= c[2] ? kHybrid : kFft2;
}

std::array<int64_t, 2> count_terms(const int64_t* rows, const int64_t* cols, int64_t k, int64_t d_out, int64_t d_in) {
  if (!worth_counting(k, d_out, d_in)) return {-1, -1};
  return term_counts(cpu::make_terms(rows, cols, k, d_out, d_in));
}

namespace cpu {

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

Plan make_plan(int64_t algo, const int64_t* rows, const int64_t* cols, int64_t k, int64_t m, int64_t n, bool inverse) {
  Plan plan{algo, false, {}};
  if (algo == kHybrid || (algo == kAuto && worth_counting(k, m, n))) plan.terms = make_terms(rows, cols, k, m, n);
  if (algo == kAuto) {
    std::array<int64_t, 2> counts{k, -1};
    if (!plan.terms.term.empty()) counts = term_counts(plan.terms);
    plan.algo = choose_algo(k, counts[0], counts[1], m, n, inverse);
  }
  // Up to kSepLoopMaxK the separable product runs as fused loops, beyond it as an MKL GEMM.
  plan.fused_loops = plan.algo == kSeparable && k <= kSepLoopMaxK[inverse ? 1 : 0];
  return plan;
}

}  // namespace cpu
}  // namespace lfma_ext
